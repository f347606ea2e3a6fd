"""The trainer as an object (issue 17): a typed config from the CLI, the engine interface, and a
Trainer whose setup / step / evaluate / save / export / fit can be driven one at a time."""
import dataclasses
import os

import pytest
import torch

from visualchat_train import cli
from visualchat_train.config import NOT_FLAGS, TrainConfig
from visualchat_train.engine import TorchEngine
from visualchat_train.schedule import SCHEDULERS, LRSchedule, lambda_lr


def test_every_flag_is_a_config_field_and_its_choices_come_from_the_type():
    from visualchat.config import ATTENTION_MODES

    parser = cli.build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(actions) == {f.name for f in dataclasses.fields(TrainConfig)} - set(NOT_FLAGS)
    assert tuple(actions["attention"].choices) == ATTENTION_MODES
    assert tuple(actions["scheduler"].choices) == SCHEDULERS
    assert tuple(actions["zero_stage"].choices) == (0, 1, 2, 3) and actions["zero_stage"].type is int
    for f in dataclasses.fields(TrainConfig):  # one default, the field's
        if f.name not in NOT_FLAGS:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert actions[f.name].default == default, f.name


def test_the_cli_hands_over_a_typed_config():
    argv = ["--preset", "smoke", "--lr", "0.5", "--attention", "causal"]
    cfg = cli.parse_args(argv)
    assert type(cfg) is TrainConfig and cfg.lr == 0.5 and cfg.attention == "causal" and cfg.argv == argv
    assert cfg.lm == "tiny" and cfg.global_batch_size == 4  # the recipe's values under the flags
    for name in cli.recipe_names():  # every recipe still loads into the config
        assert type(cli.parse_args(["--preset", name])) is TrainConfig
    with pytest.raises(ValueError, match="recipe.json set.*unknown settings: nope"):
        TrainConfig.from_dict({"lr": 1.0, "nope": 1}, "recipe.json")


def test_a_shortened_schedule_is_not_saved_in_the_schedulers_state():
    sched_fn = LRSchedule(100, 0, "linear")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lambda_lr(opt, sched_fn)
    sched_fn.total = 50  # --fit_schedule_to_time shortens the run: the lr follows at once
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(1 - 1 / 50)
    assert sched.state_dict()["lr_lambdas"] == [None]  # a resumed run takes its own flags' total


def test_the_plain_engine_averages_the_accumulated_gradient_and_clips_it():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.randn(4, 1)

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, x, y):
            return ((self.lin(x) - y) ** 2).mean(), x.shape[0]

    def engine_for(accum):
        torch.manual_seed(1)
        m = Module()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        return TorchEngine(m, list(m.parameters()), opt, sched, torch.device("cpu"), accum, grad_clip=0.5, bf16=False)

    one, two = engine_for(1), engine_for(2)
    loss, _ = one.forward({"x": x, "y": y})
    one.backward(loss)
    one.step()
    for half in (slice(0, 2), slice(2, 4)):
        loss, _ = two.forward({"x": x[half], "y": y[half]})
        two.backward(loss)
    two.step()
    for a, b in zip(one.module.parameters(), two.module.parameters()):
        torch.testing.assert_close(a, b)
        assert a.grad is None  # zeroed after the step
    # the clip held: the step moved the weights by at most lr x 0.5
    torch.manual_seed(1)
    start = torch.cat([p.detach().flatten() for p in Module().parameters()])
    moved = torch.cat([p.detach().flatten() for p in one.module.parameters()]) - start
    assert moved.norm() <= 0.1 * 0.5 + 1e-6


def test_the_trainer_runs_one_piece_at_a_time(tmp_path):
    from visualchat_train import preflight as P
    from visualchat_train.trainer import Trainer

    cfg = cli.parse_args(["--preset", "smoke", "--engine", "torch", "--output_dir", str(tmp_path), "--no_progress",
                          "--max_steps", "3", "--dataset_samples", "24"])
    trainer = Trainer(cfg, P.preflight(cfg)).setup()
    assert type(trainer.engine) is TorchEngine and trainer.total == 3 and trainer.global_step == 0
    before = trainer.evaluate()
    stream = iter(trainer.batcher.micro_batch(i, to_device=False) for i in range(100))
    result = trainer.step(stream)
    assert trainer.global_step == 1 and result.tokens > 0 and result.loss > 0
    assert trainer.evaluate() != before
    path = trainer.save()
    assert os.path.basename(path) == "step-00000001" and os.path.isfile(os.path.join(path, "complete.json"))
    trainer.export("here", {"steps": 1})
    assert os.path.isfile(os.path.join(tmp_path, "here", "config.json"))
    summary = trainer.fit()  # resumes the loop from step 1 to the end
    assert summary["steps"] == 3 and os.path.isfile(os.path.join(tmp_path, "final", "config.json"))
