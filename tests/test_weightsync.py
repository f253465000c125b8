"""weightsync: weights through shared memory — exact round trips, the run's segments and their
clean-up, merged LoRA, FSDP2 gathered per parameter, and a receiver in another process whose
log-probs follow the trainer's weights (and change when they change)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minpro_cli import weightsync
from minpro_cli.errors import MinproError
from minpro_cli.lora import LoraAdapters
from minpro_cli.modeling import embedded_model_dir
from minpro_cli.sections import LoraConfig
from minpro_cli.weightsync import WeightSegment, named_weights, planned_bytes, read_weights, remove_stale

HERE = Path(__file__).resolve().parent
TOKENS = [[1, 17, 29, 5, 40, 11, 3, 8], [2, 9, 9, 31, 6, 0, 14, 22]]


def odd_tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"scalar": (), "empty": (0, 3), "odd": (3, 5, 7), "one": (1,), "long": (1001,)}
    return {k: (torch.randn(s, generator=g, dtype=torch.float64) * 1e3).to(dtype) for k, s in shapes.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensors_round_trip_exactly_and_each_version_replaces_the_last(tmp_path, dtype):
    segment = WeightSegment(tmp_path)
    first = odd_tensors(dtype)
    reserve = sum(weightsync.aligned(t.numel() * dtype.itemsize) for t in first.values())
    table = segment.write(first.items(), version=3, reserve=reserve)
    assert all(entry["offset"] % weightsync.ALIGN == 0 for entry in table["tensors"])
    version, tensors = read_weights(segment.table)
    back = dict(tensors)
    assert version == 3 and list(back) == list(first)
    for name, tensor in first.items():
        assert back[name].dtype == dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor), name
    second = {"only": torch.arange(5, dtype=dtype)}
    segment.write(second.items(), version=4, reserve=weightsync.aligned(5 * dtype.itemsize))
    version, tensors = read_weights(segment.table)
    assert version == 4 and {k: v.tolist() for k, v in tensors} == {"only": [0, 1, 2, 3, 4]}
    assert segment.data.stat().st_size == weightsync.ALIGN  # shrunk to the new version, not kept at the old size
    segment.close()
    assert not segment.data.exists() and not segment.table.exists()


def test_the_embedded_model_streams_whole_with_its_tied_head_named(policy):
    model = policy.model
    names = [name for name, _ in named_weights(model, torch.bfloat16)]
    assert names == list(model.state_dict()) and "lm_head.weight" in names  # tied: sent under both names
    for name, tensor in named_weights(model, torch.bfloat16):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, model.state_dict()[name].to(torch.bfloat16)), name
    assert planned_bytes(model, torch.bfloat16) >= sum(t.numel() * 2 for t in model.state_dict().values())


def test_lora_adapters_arrive_merged_layer_by_layer(policy):
    model = copy.deepcopy(policy.model)
    adapters = LoraAdapters.attach(model, LoraConfig(r=4, alpha=8.0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # B starts at 0: make the merge matter
    streamed = dict(named_weights(model, torch.float32, adapters))
    merged = adapters.merged(model.state_dict())
    assert list(streamed) == list(merged) == list(policy.model.state_dict())
    changed = 0
    for name in merged:
        torch.testing.assert_close(streamed[name], merged[name], atol=0, rtol=0)
        changed += not torch.equal(streamed[name], policy.model.state_dict()[name])
    assert changed == len(adapters.scaling)  # exactly the adapted layers arrive changed
    assert planned_bytes(model, torch.float32) == planned_bytes(policy.model, torch.float32)


def test_a_killed_runs_segments_are_removed_and_a_live_runs_kept(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    leftovers = [tmp_path / f"minpro-weights-{gone.pid}-abcd{suffix}" for suffix in ("", ".json", ".json.ef01.tmp")]
    live = tmp_path / f"minpro-weights-{os.getpid()}-0000"
    for path in [*leftovers, live]:
        path.write_bytes(b"x")
    segment = WeightSegment(tmp_path)
    assert not any(p.exists() for p in leftovers) and live.exists()
    segment.write([("w", torch.ones(3))], 0, weightsync.ALIGN)
    made = [segment.data, segment.table]
    assert all(p.exists() for p in made) and remove_stale(tmp_path) == []  # its owner is alive
    del segment  # a run that ends without closing: its segment goes with it
    assert not any(p.exists() for p in made) and live.exists()


def test_a_too_small_shm_is_one_error_with_the_sizes_and_no_table(tmp_path, monkeypatch, policy):
    monkeypatch.setattr(weightsync.shutil, "disk_usage", lambda _: type("Usage", (), {"free": 1000})())
    segment = WeightSegment(tmp_path)
    need = planned_bytes(policy.model, torch.float32)
    with pytest.raises(MinproError, match=r"need 0\.\d\d GiB of shared memory in .* --shm-size.*--ipc=host"):
        segment.write(named_weights(policy.model, torch.float32), 0, need)
    assert not segment.table.exists()
    segment.close()
    assert not list(tmp_path.iterdir())


RECEIVER = """
import importlib.util, json, sys
import torch
from transformers import AutoModelForCausalLM
spec = importlib.util.spec_from_file_location("weightsync", sys.argv[1])
weightsync = importlib.util.module_from_spec(spec)
spec.loader.exec_module(weightsync)
assert "minpro_cli" not in sys.modules  # the sampler's side needs nothing of minpro's
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
tokens = torch.tensor(json.loads(sys.argv[3]))
for line in sys.stdin:
    version, weights = weightsync.read_weights(line.strip())
    model.load_state_dict(dict(weights), strict=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    print(json.dumps({"version": version, "logprobs": logp.tolist()}), flush=True)
"""


def trainer_logprobs(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.tensor(TOKENS)
    with torch.no_grad():
        return torch.log_softmax(model(tokens).logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]


def test_a_receiver_in_another_process_follows_each_update(tmp_path, policy):
    model = copy.deepcopy(policy.model)
    script = tmp_path / "receiver.py"
    script.write_text(RECEIVER)
    receiver = subprocess.Popen(
        [sys.executable, str(script), weightsync.__file__, str(embedded_model_dir()), json.dumps(TOKENS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )  # fmt: skip
    segment = WeightSegment(tmp_path)
    seen = []
    for version in (0, 1):
        if version:
            with torch.no_grad():  # an update: every weight moves
                for parameter in model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 0.05)
        segment.write(named_weights(model, torch.float32), version, planned_bytes(model, torch.float32))
        receiver.stdin.write(f"{segment.table}\n")
        receiver.stdin.flush()
        reply = json.loads(receiver.stdout.readline())
        assert reply["version"] == version
        got = torch.tensor(reply["logprobs"])
        torch.testing.assert_close(got, trainer_logprobs(model), atol=1e-5, rtol=0)
        seen.append(got)
    receiver.stdin.close()
    assert receiver.wait(timeout=60) == 0
    assert (seen[1] - seen[0]).abs().max() > 1e-2  # the update reached the receiver: not its old weights
    segment.close()


def test_two_fsdp_ranks_stream_the_full_state_dict_one_parameter_at_a_time(tmp_path, policy):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(HERE / "weightsync_worker.py"), str(tmp_path)]  # fmt: skip
    (tmp_path / "shm").mkdir()
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, cwd=HERE,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not list((tmp_path / "shm").iterdir())  # the segment went with rank 0
    held, total = map(int, (tmp_path / "snapshot-ok").read_text().split(" of "))  # the worker checked the snapshot
    assert held < 0.6 * total
    tables = list(tmp_path.glob("minpro-weights-*.json"))
    assert len(tables) == 1  # rank 0 wrote; rank 1 only joined the gathers
    version, tensors = read_weights(tables[0])
    streamed = dict(tensors)
    expected = policy.model.state_dict()
    assert version == 7 and list(streamed) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor.to(torch.bfloat16)), name
