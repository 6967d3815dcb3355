"""What the serve tests share: the model in this process for the answers each request must give (its
solo `generate` run), and waiting. The server process itself: moepic/serve/process.py."""

from __future__ import annotations

import time

from moepic.default_model import default_model_dir

# A ChatML-like template: the bundled model is a base model, so any template renders a prompt it continues.
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


class Reference:
    """The bundled model in this process, all experts resident: what each request must give."""

    def __init__(self) -> None:
        from moepic.checkpoint.load import load_model
        from moepic.tokenizer import TextCodec

        self.model = load_model(str(default_model_dir()))
        self.codec = TextCodec.from_folder(default_model_dir())

    def tokens(self, prompt_ids: list[int], max_tokens: int, *, temperature: float = 0.0, seed: int = 0) -> list[int]:
        from moepic.config import SamplingConfig
        from moepic.runtime.generation import generate

        sampling = (SamplingConfig(greedy=True) if temperature == 0 else
                    SamplingConfig(greedy=False, temperature=temperature, top_p=1.0, seed=seed))
        return generate(self.model, prompt_ids, max_new_tokens=max_tokens, sampling=sampling).token_ids

    def text(self, prompt: str, max_tokens: int, **sampling) -> str:
        return self.codec.decode(self.tokens(self.codec.encode(prompt), max_tokens, **sampling))

    def chat(self, messages: list[dict], max_tokens: int) -> str:
        from jinja2 import Template

        prompt = Template(TEMPLATE).render(messages=messages, add_generation_prompt=True)
        ids = self.codec.encode(prompt, add_special_tokens=False)
        return self.codec.decode(self.tokens(ids, max_tokens))


def wait_for(predicate, timeout: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)
