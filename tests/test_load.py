"""A short version of bench/load_test.py (issue 20) on tiny models served in this process: concurrent
normal, oversized and malformed /generate requests at concurrency 1 and a queue of 16; every one ends
with an answer or a clear refusal, and the app serves normally afterwards."""

from tests.test_app import tiny_models  # noqa: F401 (a fixture)


def test_short_load_every_request_answered_or_clearly_refused(tiny_models):  # noqa: F811
    import app
    from bench.load_test import one_request, request_mix, run_load
    from tests.test_app_client import serve

    demo = app.build_demo(tiny_models[0], concurrency=1)
    url = serve(demo, queue_size=16)
    try:
        out = run_load(url, n=24, big_mb=30, timeout=120)
        s = out["summary"]
        unclear = [r for r in out["results"] if r["outcome"] == "unclear"]
        assert not unclear, unclear
        assert s["answered"] >= 4 and s["refused"] >= 10, s
        kinds = {r["kind"]: r for r in out["results"]}
        assert "16,384 pixels on a side" in kinds["oversized: thin 1x39M PNG"]["message"] or \
            "Queue is full" in kinds["oversized: thin 1x39M PNG"]["message"]
        after = one_request(url, "after", request_mix(1)[0][1])
        assert after["outcome"] == "answered", after
    finally:
        demo.close()
