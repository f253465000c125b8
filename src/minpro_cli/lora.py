"""Low-rank adapters through peft (`model.lora`): attach, merge into whole weights, export.

The adapters are injected into the policy's own model, which keeps training as before (the
same forward, micro-batches, DDP / FSDP2, checkpoints); only the A and B matrices train.
Sampling, stale snapshots and the HF export use merged weights, W' = W + (alpha/r)·B·A, of a
plain model of the same architecture, so every sampler (vLLM included) sees an ordinary
checkpoint. The adapter is exported beside them in peft's own layout.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from minpro_cli.errors import ConfigError
from minpro_cli.sections import LoraConfig

StateDict = dict[str, torch.Tensor]
ADAPTER_DIR = "adapter"  # in a checkpoint or final/: the adapter alone, loadable by peft
ADAPTER = "default"  # peft's name for the one adapter


@dataclass
class LoraAdapters:
    peft_model: Any  # peft.PeftModel around the policy's model, which holds the adapted layers
    scaling: dict[str, float]  # adapted module name (in the policy's model) → alpha / r

    @classmethod
    def attach(cls, model: torch.nn.Module, config: LoraConfig, seed: int = 0) -> LoraAdapters:
        """Inject adapters into `model` in place (B = 0: the policy is unchanged) and freeze
        every other weight. A's random start comes from `seed` alone, so every rank (and a
        rerun) starts from the same adapters whatever its random state."""
        try:
            import peft
            from peft.tuners.lora import Linear as LoraLinear
            from peft.tuners.lora import LoraLayer
        except ImportError:
            raise ConfigError("model.lora needs peft: pip install 'minpro[lora]'") from None
        peft_config = peft.LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=config.target_modules,
            bias="none",
        )
        try:
            cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
            with warnings.catch_warnings(), torch.random.fork_rng(devices=cuda):
                warnings.filterwarnings("ignore", category=FutureWarning)  # peft asks transformers a deprecated question
                torch.manual_seed(seed)
                peft_model = peft.get_peft_model(model, peft_config)
        except ValueError as exc:  # target modules not found
            raise ConfigError(f"model.lora.target_modules: {str(exc).splitlines()[0][:300]}") from None
        layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        unsupported = [name for name, m in layers.items() if not isinstance(m, LoraLinear) or m.fan_in_fan_out]
        if unsupported:
            raise ConfigError(
                f"model.lora adapts {unsupported[0]}, which is not a plain linear layer; minpro merges adapters "
                "of nn.Linear only: list those in model.lora.target_modules"
            )
        return cls(peft_model, {name: float(m.scaling[ADAPTER]) for name, m in layers.items()})

    def merged(self, state: StateDict) -> StateDict:
        """Whole weights of the plain model from the adapted model's state: W + scaling·(B·A)
        per adapted layer (computed in float32 at least), the adapter entries dropped."""
        return dict(self.merged_items(state))

    def merged_items(
        self, state: StateDict, whole: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """`merged`, one layer at a time; `whole` makes each entry a whole tensor first (FSDP2's
        gather), so a streamed export never holds more than one layer's merge."""
        for key, tensor in state.items():
            name, base, leaf = key.partition(".base_layer.")
            if base and name in self.scaling:
                tensor = whole(tensor)
                if leaf == "weight":
                    a, b = (whole(state[f"{name}.{m}.{ADAPTER}.weight"]) for m in ("lora_A", "lora_B"))
                    exact = torch.promote_types(tensor.dtype, torch.float32)
                    delta = (b.to(exact) @ a.to(exact)) * self.scaling[name]
                    tensor = (tensor.to(exact) + delta).to(tensor.dtype)
                yield f"{name}.{leaf}", tensor
            elif ".lora_" not in key:
                yield key, whole(tensor)

    def adapter_state(self, state: StateDict) -> StateDict:
        """The adapter's tensors under the names peft saves them with."""
        return {
            f"base_model.model.{name}.{matrix}.weight": state[f"{name}.{matrix}.{ADAPTER}.weight"].contiguous()
            for name in self.scaling
            for matrix in ("lora_A", "lora_B")
        }

    def save_adapter(self, directory: Path, state: StateDict) -> None:
        """adapter_config.json + adapter_model.safetensors: `PeftModel.from_pretrained(base, directory)`."""
        directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.peft_model.peft_config[ADAPTER])
        config.task_type = "CAUSAL_LM"  # AutoPeftModelForCausalLM needs it to pick the model class
        base = config.base_model_name_or_path
        if base and Path(base).exists():  # absolute: the adapter loads from any working directory
            config.base_model_name_or_path = str(Path(base).resolve())
        config.save_pretrained(str(directory))
        save_file(self.adapter_state(state), str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model inside (the KL reference): adapters contribute nothing."""
        with self.peft_model.disable_adapter():
            yield
