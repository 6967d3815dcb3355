"""Chat templates: where they are read from, rendered as transformers renders them, sandboxed."""

from __future__ import annotations

import json

import pytest

from moepic.errors import CheckpointError
from moepic.serve.chat import ChatTemplateError, read_chat_template

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
ALTERNATING = ("{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
               "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
               "{% endfor %}")
MESSAGES = [{"role": "system", "content": "Be brief. Ünïcode ✓"}, {"role": "user", "content": "Who begat Enos?"},
            {"role": "assistant", "content": "Seth."}, {"role": "user", "content": "And Enos?"}]


def _folder(tmp_path, **config):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_a_folder_without_a_template_has_none(tmp_path):
    assert read_chat_template(tmp_path) is None
    assert read_chat_template(_folder(tmp_path, bos_token="<s>")) is None


def test_the_template_file_wins_over_tokenizer_config_and_named_templates_pick_the_default(tmp_path):
    folder = _folder(tmp_path, chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}])
    assert read_chat_template(folder).render(MESSAGES) == "D"
    (folder / "chat_template.jinja").write_text("F")
    assert read_chat_template(folder).render(MESSAGES) == "F"


@pytest.mark.parametrize("template", [CHATML, ALTERNATING.replace("{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}", "{% if false %}")])
def test_rendering_equals_transformers_apply_chat_template(tmp_path, template):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     unk_token="[UNK]", chat_template=template)
    expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    folder = _folder(tmp_path, chat_template=template, bos_token="<s>", eos_token={"content": "</s>"})
    assert read_chat_template(folder).render(MESSAGES) == expected


def test_a_template_that_refuses_the_messages_says_why(tmp_path):
    template = read_chat_template(_folder(tmp_path, chat_template=ALTERNATING, bos_token="<s>", eos_token="</s>"))
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        template.render([{"role": "assistant", "content": "x"}])


def test_the_template_runs_sandboxed(tmp_path):
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    template = read_chat_template(_folder(tmp_path, chat_template=escape))
    with pytest.raises(ChatTemplateError, match="chat template"):
        template.render(MESSAGES)


def test_a_template_that_does_not_parse_is_named_when_the_model_loads(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json chat_template: the chat template is not valid Jinja \(line 1"):
        read_chat_template(_folder(tmp_path, chat_template="{% for %}"))
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json: cannot read it as JSON"):
        read_chat_template(tmp_path)


def test_a_gguf_file_carries_its_template_and_its_bos_and_eos_tokens_by_id(tmp_path):
    from tokenizers import Tokenizer

    from gguf_writing import write_gguf
    from moepic.default_model import default_model_dir

    bundled = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    path = write_gguf(default_model_dir(), tmp_path / "kjv.gguf", tokenizer={
        "tokenizer": bundled, "kind": "gpt2", "pre": "gpt-2", "chat_template": "{{ bos_token }}|{{ messages[0]['content'] }}|{{ eos_token }}"})
    config = json.loads((default_model_dir() / "config.json").read_text())
    bos, eos = (bundled.id_to_token(config[key]) for key in ("bos_token_id", "eos_token_id"))
    assert read_chat_template(path).render(MESSAGES) == f"{bos}|{MESSAGES[0]['content']}|{eos}"
    assert read_chat_template(write_gguf(default_model_dir(), tmp_path / "plain.gguf",
                                         tokenizer={"tokenizer": bundled, "kind": "gpt2", "pre": "gpt-2"})) is None
