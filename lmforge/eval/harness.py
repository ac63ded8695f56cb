"""lm-evaluation-harness backend: the model type "lmforge" for `lm_eval`.

lm-eval finds model types in its registry, so this module must be imported before it runs. Either

    python -m lmforge.eval.harness run --model lmforge --model_args pretrained=DIR --tasks hellaswag

(this module registers the type, then hands its arguments to lm-eval's own CLI), or in Python:

    import lmforge.eval.harness  # registers "lmforge"
    lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=DIR", tasks=[...])

The three requests go to `lmforge.eval.lm.LocalLM`, the same code `lmforge eval` scores with, so a
task gives the same numbers through either front end.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lmforge.eval.lm import LocalLM


@register_model("lmforge")
class LmforgeHarnessLM(LM):
    """model_args: pretrained (model folder), device, dtype, batch_size, max_length. `lm=` passes a
    ready `LocalLM` (tests, the pipeline)."""

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        lm: LocalLM | None = None,
        **_ignored,
    ):
        super().__init__()
        if lm is None:
            if not pretrained:
                raise ValueError("model_args needs pretrained=<lmforge checkpoint or HF folder>")
            bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
            if device and device.startswith("cuda") and not torch.cuda.is_available():
                device = None  # lm-eval asks for cuda by default; use what this machine has
            lm = LocalLM.load(
                pretrained,
                device=device,
                dtype=dtype,
                batch_size=bs,
                max_length=int(max_length) if max_length else None,
            )
        self.lm = lm

    # Chat templating (`--apply_chat_template`): the template stored with the checkpoint.
    @property
    def tokenizer_name(self) -> str:
        return self.lm.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.lm.tokenizer.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.lm.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.lm.loglikelihood([tuple(r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.lm.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:  # each request has its own stop strings and limits
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            out += self.lm.generate(
                [context],
                max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                stop=until,
                temperature=temperature,
                seed=kwargs.get("seed"),
            )
        return out


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
