"""Sample text from a trained causal checkpoint, printed as it is produced:

    python generate.py ckpt_path=logs/train/runs/X/checkpoints/best.ckpt prompt="The meaning of" \
        max_new_tokens=200 temperature=0.8 top_k=50 top_p=0.95 seed=0
    python generate.py ckpt_path=... prompt_file=prompt.txt device=cuda

The model comes from the config the checkpoint records (read with weights_only=True), the tokenizer
from the run's data: bytes for byte-level data, else the BPE cached with the run's data (found or
rebuilt from data.path as eval.py does; data.path= and data.cache_dir= may point elsewhere).

The prompt runs in one parallel forward (`TransformerLM.prefill`), then each new token is one
`step` on the attention's decoding state. Sampling: temperature 0 is greedy; otherwise the logits
are divided by temperature, cut to the top_k most likely tokens (0: all) and then to the smallest
set whose probability reaches top_p (1: all), and sampled with a generator seeded by `seed`, on the
CPU, so a seed gives the same text on any device. device: auto (cuda where there is one), cpu or
cuda. The prompt is echoed, then the continuation streams to stdout, each character once its
bytes are complete. A masked-LM checkpoint, an empty prompt, a prompt token outside the model's
vocabulary or data without a text tokenizer is refused: one paragraph, exit 2.
"""

import codecs
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from fma import ConfigurationError
from train import build_module, check_shapes, exit_on_configuration_error, load_checkpoint, recorded_config

SETTINGS = {"ckpt_path": str, "prompt": str, "prompt_file": str, "max_new_tokens": int, "temperature": float,
            "top_k": int, "top_p": float, "seed": int, "device": str}
DEFAULTS = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": 0, "device": "auto"}
EXAMPLE = 'python generate.py ckpt_path=<run>/checkpoints/best.ckpt prompt="Once upon a time"'


def parse_arguments(argv: list[str]) -> tuple[dict, list[str]]:
    """(generate.py's settings, the data.path / data.cache_dir overrides) from key=value arguments.
    A prompt is taken as written (no YAML or Hydra parsing: commas and quotes are text)."""
    own, overrides = dict(DEFAULTS), []
    for argument in argv:
        key, equals, value = argument.partition("=")
        if not equals:
            raise ConfigurationError(f"{argument!r} is not key=value; run e.g. {EXAMPLE}.")
        if key in ("data.path", "data.cache_dir"):
            overrides.append(argument)
        elif key not in SETTINGS:
            raise ConfigurationError(f"{key}= is not a setting of generate.py; use {', '.join(SETTINGS)}, data.path= "
                                     f"or data.cache_dir= (the checkpoint fixes the model).")
        else:
            try:
                own[key] = SETTINGS[key](value)
            except ValueError:
                raise ConfigurationError(f"{key}={value} is not a {SETTINGS[key].__name__}; e.g. {EXAMPLE} "
                                         f"max_new_tokens=200 temperature=0.8.") from None
    if "ckpt_path" not in own:
        raise ConfigurationError(f"generate.py needs ckpt_path= (a checkpoint train.py wrote); run e.g. {EXAMPLE}.")
    if own["max_new_tokens"] < 0 or own["temperature"] < 0 or own["top_k"] < 0 or not 0 < own["top_p"] <= 1:
        raise ConfigurationError(
            f"max_new_tokens={own['max_new_tokens']}, temperature={own['temperature']}, top_k={own['top_k']}, "
            f"top_p={own['top_p']}: the first three must not be negative (temperature=0: greedy, top_k=0: no cut) "
            f"and top_p must lie in (0, 1] (1: no cut).")
    if own["device"] not in ("auto", "cpu", "cuda") or (own["device"] == "cuda" and not torch.cuda.is_available()):
        raise ConfigurationError(f"device={own['device']}: use device=auto, cpu, or cuda where PyTorch sees a GPU.")
    return own, overrides


def prompt_text(own: dict) -> str:
    """The prompt from prompt= or prompt_file= (exactly one), not empty."""
    if ("prompt" in own) == ("prompt_file" in own):
        raise ConfigurationError(f"Give the prompt as prompt=\"...\" or prompt_file=<path>, one of them; run e.g. "
                                 f"{EXAMPLE}.")
    if "prompt_file" in own:
        path = Path(own["prompt_file"])
        if not path.is_file():
            raise ConfigurationError(f"prompt_file={path} is not a file; point prompt_file= at a UTF-8 text file.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ConfigurationError(f"prompt_file={path} is not UTF-8 text ({error.reason} at byte "
                                     f"{error.start}); convert it to UTF-8.") from None
    else:
        text = own["prompt"]
    if not text:
        raise ConfigurationError("The prompt is empty, and a model needs at least one token to continue; pass a "
                                 "non-empty prompt= or prompt_file=.")
    return text


@dataclass
class TextTokenizer:
    """A run's tokenizer as generation needs it: `encode` text -> ids, and the bytes of every id."""

    encode: Callable[[str], list[int]]
    token_bytes: list[bytes]


def byte_level_table() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): the printable character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {chr(byte): byte for byte in printable} | {chr(256 + i): byte for i, byte in enumerate(others)}


def run_tokenizer(datamodule) -> TextTokenizer:
    """Bytes, or the BPE of the run's data cache (data/bpe.py saves it there as tokenizer.json)."""
    cache = getattr(datamodule, "cache", None)
    if cache is not None and (cache / "tokenizer.json").is_file():
        tokenizer, table = Tokenizer.from_file(str(cache / "tokenizer.json")), byte_level_table()
        pieces = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
        return TextTokenizer(lambda text: tokenizer.encode(text).ids, [bytes(table[c] for c in p) for p in pieces])
    if cache is not None and datamodule.metric == "bpc":
        return TextTokenizer(lambda text: list(text.encode("utf-8")), [bytes([i]) for i in range(256)])
    where = f"its data cache {cache} holds no tokenizer.json" if cache is not None else "it reads no text"
    raise ConfigurationError(
        f"The checkpoint's data ({datamodule.__class__.__name__}) has no text tokenizer: {where}. Generate from a run "
        f"trained on text (data=text, enwik8, wikitext103), pointing data.path= and data.cache_dir= at its data.")


def sample(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator) -> torch.Tensor:
    """logits [batch, vocab] (CPU) -> token ids [batch], as the module docstring defines."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.double() / temperature
    if top_k:
        top = logits.topk(min(top_k, logits.shape[-1]))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
    if top_p < 1:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p  # the likelier tokens alone reach top_p
        logits = logits.masked_fill(torch.empty_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def generate(argv: list[str], out=sys.stdout) -> str:
    """Runs generate.py as argv asks, streaming the prompt and its continuation to `out`; returns the continuation."""
    own, overrides = parse_arguments(argv)
    prompt = prompt_text(own)
    saved = load_checkpoint(own["ckpt_path"])
    recorded = recorded_config(own["ckpt_path"], saved)
    cfg = OmegaConf.merge(OmegaConf.create(recorded), {"compile": False, "trainer": {"accelerator": "cpu"}},
                          OmegaConf.from_dotlist(overrides))
    if not hydra.utils.instantiate(cfg.objective).causal:
        raise ConfigurationError(f"The checkpoint {own['ckpt_path']} is a masked LM ({cfg.objective._target_}), "
                                 f"which fills in masked tokens but does not continue text; use a checkpoint "
                                 f"trained with objective=clm.")
    datamodule, module, _ = build_module(cfg, recorded)
    tokenizer = run_tokenizer(datamodule)
    check_shapes(own["ckpt_path"], saved["state_dict"], module)
    module.load_state_dict(saved["state_dict"])
    device = own["device"] if own["device"] != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    net = module.net.to(device).eval()

    ids = tokenizer.encode(prompt)
    unknown = sorted({i for i in ids if i >= net.vocab_size})
    if unknown:
        raise ConfigurationError(f"The prompt encodes to token ids {unknown[:5]} outside the model's vocabulary of "
                                 f"{net.vocab_size}: the tokenizer found is not the one it was trained with. Point "
                                 f"data.path= and data.cache_dir= at the run's data.")
    limit = cfg.model.attention.get("max_seq_len")
    if limit is not None and len(ids) + own["max_new_tokens"] > limit:
        raise ConfigurationError(
            f"The prompt's {len(ids)} tokens and max_new_tokens={own['max_new_tokens']} exceed the model's "
            f"max_seq_len={limit} ({cfg.model.attention.name} has no parameters past it); lower max_new_tokens= or "
            f"shorten the prompt.")

    out.write(prompt)
    out.flush()
    generator = torch.Generator().manual_seed(own["seed"])
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    with torch.inference_mode():
        logits, state = net.prefill(torch.tensor([ids], device=device))
        logits = logits[:, -1]
        for produced in range(own["max_new_tokens"]):
            token = sample(logits.float().cpu(), temperature=own["temperature"], top_k=own["top_k"],
                           top_p=own["top_p"], generator=generator)
            pieces.append(decoder.decode(tokenizer.token_bytes[token.item()]))
            out.write(pieces[-1])
            out.flush()
            if produced + 1 < own["max_new_tokens"]:
                logits, state = net.step(token.to(device), state)
    pieces.append(decoder.decode(b"", final=True))
    out.write(pieces[-1] + "\n")
    return "".join(pieces)


def main() -> None:
    exit_on_configuration_error(generate, sys.argv[1:])


if __name__ == "__main__":
    main()
