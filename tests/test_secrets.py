"""No token, key or password reaches the model card, the logs, output_dir or the Hub (issue 10, item 8),
and checkpoint pushes during training (push_to_hub + hub_strategy) carry our model card.

The real run_cpt / run_sft CLIs run with ``--hub_token`` and credentials in the environment, pushing
to the local fake Hub (tests/hub_server.py); every file written under output_dir and every file that
arrived on the Hub is searched byte for byte (and decoded, for JSON and training_args.bin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import TrainerCallback

from hub_server import FakeHub
from prolong.checkpoint.checkpoints import MARKER, incomplete_reason

pytestmark = pytest.mark.slow  # CLI runs in subprocesses against a local Hub (make test-fast skips them)

REPO = Path(__file__).resolve().parent.parent
HUB_TOKEN = "hf_SECRETcliHubToken0123456789"
ENV_SECRETS = {"HF_TOKEN": "hf_SECRETenvToken9876543210", "OPENAI_API_KEY": "sk-SECRETopenai0123456789",
               "WANDB_API_KEY": "SECRETwandb0123456789abcdef"}
SECRETS = [HUB_TOKEN, *ENV_SECRETS.values()]


def _run(script: str, args: list[str], hub: FakeHub, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV_SECRETS, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(home), "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, str(REPO / "prolong" / script), *args], env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _leaks(name: str, data: bytes) -> list[str]:
    found = [f"{name}: {secret}" for secret in SECRETS if secret.encode() in data]
    if name.endswith(".json"):
        text = json.dumps(json.loads(data))  # decoded, in case a serialiser escaped something
        found += [f"{name} (decoded): {secret}" for secret in SECRETS if secret in text]
    return found


def _scan(output_dir: Path, hub: FakeHub, repo_id: str, logs: str) -> None:
    leaks = [f"logs: {s}" for s in SECRETS if s in logs]
    for path in output_dir.rglob("*"):
        if path.is_file():
            leaks += _leaks(str(path.relative_to(output_dir)), path.read_bytes())
            if path.name == "training_args.bin":  # the Trainer pickles its whole arguments object
                args = torch.load(path, weights_only=False)
                leaks += [f"{path.name} (unpickled): {s}" for s in SECRETS if s in repr(vars(args))]
    for name, data in hub.files(repo_id).items():
        leaks += _leaks(f"hub:{name}", data)
    assert not leaks, leaks


def _cpt_args(model_dir, mixture, out, *extra):
    values = dict(model_name_or_path=model_dir, dataset_mixture=json.dumps(mixture), max_length=128,
                  per_device_train_batch_size=2, max_steps=2, save_steps=1, learning_rate=1e-3, output_dir=str(out),
                  report_to="none", disable_tqdm="true", push_to_hub="true", hub_model_id="me/tiny-cpt",
                  hub_strategy="checkpoint", hub_token=HUB_TOKEN,
                  hub_always_push="true")  # else the Trainer skips a checkpoint whose predecessor is still pushing
    return [item for key, value in values.items() for item in (f"--{key}", str(value))] + list(extra)


def _seconds_after(path: Path, seconds: float):
    """A condition true from ``seconds`` after ``path`` appeared."""
    seen: list[float] = []

    def condition() -> bool:
        if not seen and path.exists():
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= seconds

    return condition


def test_cpt_pushes_checkpoints_with_our_card_and_no_secret_anywhere(tiny_model_dir, packed_mixture, tmp_path):
    out = tmp_path / "cpt"
    # a slow network: step 1's push is still uploading output_dir when checkpoint-2 is saved and pushed (the
    # Trainer copies each checkpoint's weights into output_dir before uploading it). Step 2 must wait for it:
    # rewriting output_dir under a running upload made step 1's commit fail, silently, in the background
    slow_step_1 = {"lfs": _seconds_after(out / "checkpoint-2" / MARKER, 1.5)}
    with FakeHub(token=HUB_TOKEN, hold=slow_step_1) as hub:
        result = _run("run_cpt.py", _cpt_args(tiny_model_dir, packed_mixture, out), hub, tmp_path / "home")
        _scan(out, hub, "me/tiny-cpt", result.stdout + result.stderr)
        files = hub.files("me/tiny-cpt")
        summaries = [c["summary"] for c in hub.commits]
        step_1_files = hub.files_at("me/tiny-cpt", hub.commits[0]["oid"]) if hub.commits else {}
        assert hub.held, "no request was held: the test would not test the overlap"

    # hub_strategy "checkpoint": output_dir and last-checkpoint/ at every save, then the final model
    assert summaries == ["Training in progress, step 1", "Training in progress, step 1, checkpoint",
                         "Training in progress, step 2", "Training in progress, step 2, checkpoint",
                         "ProLong continued-pretraining"], summaries
    # step 1's commit holds step 1's weights, not those copied into output_dir at step 2
    assert step_1_files["model.safetensors"] == (out / "checkpoint-1" / "model.safetensors").read_bytes()
    output_dir_pushes = [c for c in hub.commits if not c["summary"].endswith("checkpoint")]
    assert all("README.md" in c["paths"] for c in output_dir_pushes)  # our card on every push
    assert {"last-checkpoint/trainer_state.json", "model.safetensors", "config.json"} <= set(files)
    # the pushed checkpoint is complete (marker included, pushed after it), so a resume from a
    # download of last-checkpoint/ takes it
    pushed = tmp_path / "downloaded" / "last-checkpoint"
    for name, data in files.items():
        if name.startswith("last-checkpoint/"):
            (tmp_path / "downloaded" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "downloaded" / name).write_bytes(data)
    assert incomplete_reason(str(pushed)) is None
    assert json.loads((pushed / MARKER).read_text())["global_step"] == 2
    card = ModelCard(files["README.md"].decode())
    assert "Trained with ProLong recipes" in card.text and "<redacted>" in card.text  # the recipe's hub_token
    assert card.data.pipeline_tag == "text-generation" and "continued-pretraining" in card.data.tags
    assert (out / "README.md").read_bytes() == files["README.md"]


def test_a_checkpoint_push_skipped_while_the_previous_one_runs_is_logged_and_its_folder_kept(
        tiny_model_dir, packed_mixture, tmp_path, monkeypatch, caplog):
    """Without hub_always_push the Trainer skips a checkpoint push while the previous one still runs: said.
    save_total_limit 1 must not delete the checkpoint still uploading (its push would fail)."""
    import transformers.utils.hub
    from huggingface_hub import constants

    from prolong.run_cpt import main

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "cpt"
    slow_step_1 = {"lfs": _seconds_after(out / "checkpoint-2" / MARKER, 1.0)}
    with FakeHub(token=HUB_TOKEN, hold=slow_step_1) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        main(_cpt_args(tiny_model_dir, packed_mixture, out, "--hub_always_push", "false", "--save_total_limit", "1"))
        assert hub.held and [c["summary"] for c in hub.commits] == [
            "Training in progress, step 1", "Training in progress, step 1, checkpoint", "ProLong continued-pretraining"]
    assert "Step 2: the previous checkpoint push to me/tiny-cpt is still running, so this checkpoint is not pushed " \
           "(hub_always_push: true waits for it instead)" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # rotated once the push was done


class _MarkerAtPush(TrainerCallback):
    """A checkpoint push (hub_strategy) starts only once the checkpoint is complete: a pushed
    checkpoint without its marker is one no resume would take."""

    def on_push_begin(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        assert incomplete_reason(str(checkpoint)) is None, f"{checkpoint} pushed before it was complete"


def test_sft_writes_no_secret_anywhere(tiny_model_dir, tmp_path, monkeypatch, capfd):
    """In-process (one interpreter start is enough for the suite): run_sft's main, pushing at the end."""
    import transformers.utils.hub
    from huggingface_hub import constants

    from prolong.run_sft import main

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "the of and"},
                                                     {"role": "assistant", "content": f"to in is {i}"}]}) + "\n"
                            for i in range(8)))
    out = tmp_path / "sft"
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--output_dir", str(out),
            "--max_length", "128", "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps", "2",
            "--learning_rate", "1e-2", "--use_cpu", "true", "--report_to", "none", "--activation_checkpointing",
            "false", "--attn_implementation", "sdpa", "--push_to_hub", "true", "--hub_model_id", "me/tiny-sft",
            "--hub_token", HUB_TOKEN, "--disable_tqdm", "true"]
    for name, value in ENV_SECRETS.items():
        monkeypatch.setenv(name, value)  # restored after the test, also HF_TOKEN which the run replaces
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # transformers caches one HfApi (endpoint)
    with FakeHub(token=HUB_TOKEN) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        main(args, callbacks=[_MarkerAtPush()])
        captured = capfd.readouterr()
        _scan(out, hub, "me/tiny-sft", captured.out + captured.err)
        assert "README.md" in hub.files("me/tiny-sft") and (out / "checkpoint-2").is_dir()
        assert [c["summary"] for c in hub.commits] == ["Training in progress, step 2", "ProLong sft"]


@pytest.mark.parametrize("case", ["401-at-create", "403-at-final-commit", "403-at-checkpoint-commit"])
def test_a_refused_push_exits_2_with_one_message_and_keeps_the_trained_model(
        case, tiny_model_dir, packed_mixture, tmp_path, monkeypatch, capsys, caplog):
    import transformers.utils.hub
    from huggingface_hub import constants

    from prolong.errors import cli_errors
    from prolong.run_cpt import main

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "cpt"
    token = "hf_wrong_token_123456" if case == "401-at-create" else HUB_TOKEN
    strategy = "checkpoint" if case == "403-at-checkpoint-commit" else "end"
    args = _cpt_args(tiny_model_dir, packed_mixture, out, "--hub_strategy", strategy, "--max_steps", "1",
                     "--hub_token", token)
    with FakeHub(token=HUB_TOKEN, fail={"commit": 403}) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        with pytest.raises(SystemExit) as exit_info:
            cli_errors("run_cpt")(main)(args)
        assert hub.commits == []
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    if case == "401-at-create":
        assert "cannot create the model repository: the Hub rejected the token (401) for me/tiny-cpt" in last
        assert not (out / "config.json").exists()  # refused before training
    else:
        assert "no write access to me/tiny-cpt (403)" in last and f"hf upload me/tiny-cpt {out}" in last
        assert (out / "config.json").exists() and (out / "model.safetensors").exists()  # the model is kept
    # a checkpoint push fails in the background (a future the Trainer only waits for): it is reported, once
    reported = [r.getMessage() for r in caplog.records if "The checkpoint push of step" in r.getMessage()]
    if case == "403-at-checkpoint-commit":
        assert len(reported) == 1 and "step 1 to me/tiny-cpt failed: the token has no write access" in reported[0]
    else:
        assert reported == []
    assert HUB_TOKEN not in err and token not in err
