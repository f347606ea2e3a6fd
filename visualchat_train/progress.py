"""Progress on rank 0: a tqdm bar (loss, lr, tokens/s; tqdm shows the ETA), ``metrics.jsonl`` and
optionally TensorBoard."""
from __future__ import annotations

import json
import os
import time


class Progress:
    def __init__(self, output_dir: str, total: int, start: int, bar: bool, main: bool, tensorboard: bool = False):
        self.main = main
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.bar = None
        self.tb = None
        self.t0 = time.time()
        self.last_val = None
        if main:
            kept = []
            if start > 0 and os.path.isfile(self.path):  # resumed: drop what came after the checkpoint
                with open(self.path) as f:
                    kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start]
            with open(self.path, "w") as f:
                f.writelines(kept)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start or None)
                except ImportError as e:
                    raise ImportError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {e}") from None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", desc="train", dynamic_ncols=True, smoothing=0.1)

    def set_total(self, total: int) -> None:
        """The run's number of steps changed (``--fit_schedule_to_time``)."""
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def _write(self, rec: dict) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def log_train(self, step: int, loss: float, lr: float, tok_s: float, tokens: float, write: bool = True) -> None:
        if self.bar is not None:
            post = {"loss": f"{loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:.0f}"}
            if self.last_val is not None:
                post["val"] = f"{self.last_val:.3f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        if write:
            self._write({"step": step, "loss": round(loss, 6), "lr": lr, "tokens_per_s": round(tok_s, 1),
                         "tokens": int(tokens), "elapsed_s": round(time.time() - self.t0, 2)})
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/tokens_per_s", tok_s, step)

    def log_val(self, step: int, val: float) -> None:
        self.last_val = val
        self._write({"step": step, "val_loss": round(val, 6), "elapsed_s": round(time.time() - self.t0, 2)})
        if self.tb is not None:
            self.tb.add_scalar("val/loss", val, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
