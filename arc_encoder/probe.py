"""Does a causal LM read its context? Three held-out measurements, each with a gate.

ARC's reconstruction objective asks the frozen decoder to read text back out of the vectors
in its context. A decoder that cannot copy text it has just seen cannot learn that from any
encoder, so stand-in decoders are measured, and refused, with:

* **induction**: a sequence of ``induction_len`` uniformly random tokens, repeated once. Its
  second copy can only be predicted by copying, so the mean NLL of the second copy must be
  <= ``induction_max`` nats/token. The first token of each copy is skipped: nothing in the
  row predicts which token starts a copy.
* **copy**: a held-out passage of ``copy_len`` tokens, repeated once; the second copy's NLL
  (first token skipped, as above) must be <= ``copy_max``.
* **open-book gain**: a ``continuation_len``-token continuation scored with the preceding
  ``context_len`` tokens in context vs with none; the drop in mean NLL must be
  >= ``gain_min``. Every continuation token counts in both.

Each row starts with the decoder's BOS token (its EOS when it has no BOS). All rows have one
length, so no padding or attention mask is involved. Losses are natural-log NLL per token.
``probe_texts`` runs all three on raw held-out texts (`arc-encoder probe`, benchmarks/quality.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProbeConfig  # noqa: F401 - defined torch-free so that the CLI parser needs no torch

GATES = ("induction", "copy", "open_book_gain")


@dataclass
class ProbeResult:
    """Mean NLL (nats/token) of each measured span, and how many rows each came from."""

    induction_first: float  # first copy of the random sequence (tokens 2..L)
    induction_second: float  # second copy (tokens 2..L): the induction gate
    copy_first: float  # held-out passage, first time (tokens 2..L)
    copy_second: float  # the same passage again: the copy gate
    closed_book: float  # continuation with no context
    open_book: float  # continuation after its preceding context
    open_book_gain: float  # closed_book - open_book: the gain gate
    induction_rows: int
    passages: int
    config: ProbeConfig

    def gates(self) -> dict[str, bool]:
        c = self.config
        return {
            "induction": self.induction_second <= c.induction_max,
            "copy": self.copy_second <= c.copy_max,
            "open_book_gain": self.open_book_gain >= c.gain_min,
        }

    @property
    def passed(self) -> bool:
        return all(self.gates().values())

    def failures(self) -> list[str]:
        """One line per missed gate, with the measured value and the bound."""
        c, out = self.config, []
        g = self.gates()
        if not g["induction"]:
            out.append(f"induction: second-copy loss {self.induction_second:.3f} > {c.induction_max} nats/token")
        if not g["copy"]:
            out.append(f"copy: second-copy loss {self.copy_second:.3f} > {c.copy_max} nats/token")
        if not g["open_book_gain"]:
            out.append(f"open-book gain {self.open_book_gain:.3f} < {c.gain_min} nats/token "
                       f"(closed {self.closed_book:.3f}, open {self.open_book:.3f})")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gates"] = self.gates()
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        return (f"induction {self.induction_first:.2f}->{self.induction_second:.3f}, "
                f"copy {self.copy_first:.2f}->{self.copy_second:.3f}, "
                f"open-book {self.closed_book:.3f}->{self.open_book:.3f} (gain {self.open_book_gain:.3f})"
                f"{'' if self.passed else ' FAILED: ' + '; '.join(self.failures())}")


@torch.no_grad()
def token_nll(model: nn.Module, ids: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """NLL of ids[:, 1:] given everything before it: [rows, n - 1], float32 on the CPU.

    ``model`` is any causal LM that maps ``input_ids`` to ``.logits`` (a Hugging Face model).
    Rows are scored in eval mode; the model's training flag is restored afterwards.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, ids.shape[0], batch_size):
            rows = ids[start : start + batch_size].to(device)
            logits = model(input_ids=rows, use_cache=False).logits[:, :-1].float()
            out.append(F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none").cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def random_rows(vocab_size: int, length: int, rows: int, exclude: Sequence[int] = (), seed: int = 0) -> torch.Tensor:
    """[rows, length] token ids drawn uniformly from the vocabulary minus ``exclude`` (seeded)."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in exclude if 0 <= i < vocab_size]] = False
    pool = allowed.nonzero().squeeze(1)
    if len(pool) < 2:
        raise ValueError("random_rows needs at least 2 allowed token ids")
    gen = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (rows, length), generator=gen)]


def heldout_windows(docs: Sequence[Sequence[int]], length: int, count: int, seed: int = 0) -> torch.Tensor:
    """Up to ``count`` windows of ``length`` tokens, one per document that is long enough.

    Documents are visited in a seeded hash order and each window starts at a seeded offset,
    so file headers (licence boilerplate a model may have memorised) are not over-represented.
    """
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    out = []
    for i in order:
        doc = docs[i]
        if len(doc) < length:
            continue
        span = len(doc) - length
        start = int.from_bytes(hashlib.sha256(f"{seed}:{i}:start".encode()).digest()[:8], "big") % (span + 1)
        out.append(torch.as_tensor(list(doc[start : start + length]), dtype=torch.long))
        if len(out) == count:
            break
    if not out:
        raise ValueError(f"no document has {length} tokens")
    return torch.stack(out)


def _second_copy(model: nn.Module, seqs: torch.Tensor, bos_id: int, batch_size: int) -> tuple[float, float]:
    """Mean NLL of copy 1 and copy 2 of [BOS] + s + s, each over tokens 2..L of its copy."""
    n, length = seqs.shape
    rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), seqs, seqs], dim=1)
    nll = token_nll(model, rows, batch_size)  # nll[:, j] scores rows[:, j + 1]
    # rows[:, 1 + k] is copy-1 token k and rows[:, 1 + length + k] copy-2 token k; skip k = 0.
    first = nll[:, 1:length]
    second = nll[:, length + 1 : 2 * length]
    return float(first.mean()), float(second.mean())


def probe_decoder(
    model: nn.Module,
    passages: torch.Tensor,
    bos_id: int,
    vocab_size: int,
    exclude_ids: Sequence[int] = (),
    config: ProbeConfig | None = None,
) -> ProbeResult:
    """Run the three measurements. ``passages``: [n, >= config.window_len] held-out token ids.

    ``exclude_ids`` (special tokens) are never drawn for the random induction sequences.
    """
    config = config or ProbeConfig()
    if passages.dim() != 2 or passages.shape[1] < config.window_len:
        raise ValueError(f"passages must be [n, >= {config.window_len}] token ids, got {tuple(passages.shape)}")
    bs = config.batch_size
    rand = random_rows(vocab_size, config.induction_len, config.induction_rows, exclude_ids, config.seed)
    ind_first, ind_second = _second_copy(model, rand, bos_id, bs)
    copy_first, copy_second = _second_copy(model, passages[:, : config.copy_len], bos_id, bs)

    n, c, t = passages.shape[0], config.context_len, config.continuation_len
    bos = torch.full((n, 1), bos_id, dtype=torch.long)
    cont = passages[:, c : c + t]
    closed = float(token_nll(model, torch.cat([bos, cont], 1), bs).mean())
    opened = float(token_nll(model, torch.cat([bos, passages[:, : c + t]], 1), bs)[:, c:].mean())
    return ProbeResult(ind_first, ind_second, copy_first, copy_second, closed, opened, closed - opened,
                       induction_rows=config.induction_rows, passages=n, config=config)


def decoder_bos(tokenizer) -> int:
    """The id that starts every probe row: BOS, else EOS (GPT-2-style tokenizers); neither is an error."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the decoder's tokenizer has neither a BOS nor an EOS token to start probe rows with")


def text_windows(tokenizer, texts: Sequence[str], config: ProbeConfig, count: int = 64) -> torch.Tensor:
    """Held-out passages for the probe: one window of ``config.window_len`` decoder tokens per text long
    enough (`heldout_windows`), up to ``count``; the error says how long a text must be."""
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts if isinstance(t, str) and t.strip()]
    if not docs:
        raise ValueError("no text to probe with")
    longest = max(len(d) for d in docs)
    if longest < config.window_len:
        raise ValueError(f"no text has the {config.window_len} decoder tokens a probe passage needs (the longest has "
                         f"{longest}); give longer held-out texts")
    return heldout_windows(docs, config.window_len, count, seed=config.seed)


def probe_texts(model: nn.Module, tokenizer, texts: Sequence[str], config: ProbeConfig | None = None,
                count: int = 64) -> ProbeResult:
    """The three measurements on raw held-out ``texts`` with ``model``'s own ``tokenizer``."""
    config = config or ProbeConfig()
    windows = text_windows(tokenizer, texts, config, count)
    vocab = min(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    return probe_decoder(model, windows, decoder_bos(tokenizer), vocab, tokenizer.all_special_ids, config)
