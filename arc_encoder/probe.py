"""Does a causal LM read its context? Three held-out measurements, each with a RELATIVE gate.

ARC's reconstruction objective asks the frozen decoder to read text back out of the vectors
in its context. A decoder that cannot copy text it has just seen cannot learn that from any
encoder, so decoders are measured, and refused, with three ratios. Each compares the same
tokens with and without something to read, so a model's general skill (how surprised it is by
random or technical text) cancels out, and a gate means the same for an 11M-parameter stand-in
and a 270M-parameter pretrained LLM:

* **induction**: ``induction_rows`` rows of ``induction_len`` random tokens, the sequence
  repeated once. Only copying predicts the second copy, so the gate is the share of the first
  copy's loss that is LEFT on the second: ``induction_ratio = NLL(copy 2) / NLL(copy 1)`` must
  be <= ``induction_ratio_max``. A decoder that cannot see 64 tokens back scores ~1.0; real
  LLMs 0.04-0.09. The random tokens are drawn uniformly from the distinct token ids of the
  held-out passages (special tokens excluded): ids this tokenizer really produces on text.
  Drawing from the whole vocabulary instead (``induction_tokens="vocabulary"``, the earlier
  measure) also draws ids a model rarely or never saw in training (Gemma 3 has thousands of
  reserved ids), which measures those ids' embeddings, not copying.
* **copy**: the first ``copy_len`` tokens of a held-out window of ``window_len`` tokens, repeated
  after the window; ``copy_ratio = NLL(copy 2) / NLL(copy 1)`` must be <= ``copy_ratio_max``.
  In both, the first token of each copy is skipped: nothing in the row predicts which token
  starts a copy.
* **open-book gain**: a ``continuation_len``-token continuation scored after the preceding
  ``context_len`` tokens vs with no context; the share of the closed-book loss the context
  removes, ``gain_ratio = (closed - open) / closed``, must be >= ``gain_ratio_min``. The same
  continuation tokens count in both (all of them after a BOS; without one, the first token,
  which a context-free row cannot predict, is skipped in both). The open-book continuation is
  the end of the copy row's window (prefix + window + window[:copy_len]): causal attention makes
  those tokens' scores exactly those of a row that stops there, and the probe runs 29% fewer tokens.

The gates were absolute at first (second copy <= 1.0 and 0.5 nats/token, gain >= 0.3 nats),
tuned on small stand-ins trained with planted random-token repeats. SmolLM2-135M, a real reader,
failed induction at 2.82 nats/token although that is 0.20 of its first copy's 14.0 nats: drawn
from its whole 49k vocabulary, random tokens are mostly rare ids it copies imperfectly (1.00 nats
when drawn from the text's ids). Gemma 3 270M failed it too (1.20). The defaults sit between the
readers and non-readers measured in benchmarks/results/probe_real_cpu.json (benchmarks/README.md,
"Probe on real LLMs"), a factor of about two from each for induction and copy:

    decoder                               induction  copy       gain (share of closed book)
    SmolLM2-135M                          0.090      0.091      0.219
    Gemma 3 270M                          0.037      0.043      0.227
    stand-ins A, B, variants (recorded)   0.07-0.24  0.13-0.20  0.35-0.38
    bundled tiny decoder                  1.007      1.556      -0.873
    SmolLM2, Gemma 3 with attention cut   0.98-1.01  0.99-1.06  -0.03-0.08
      to the last 16 tokens (controls)
    gate                                  <= 0.5     <= 0.5     >= 0.1

The gain gate is the weakest separator: a closed-book row's first tokens have no context at all,
so a decoder reading only its last 16 tokens gains there too (0.07-0.08); it is refused by the
induction and copy gates.

Each row starts with the decoder's own prefix (``arc_encoder.decoders.decoder_prefix_ids``: its BOS
where its tokenizer adds one, else nothing). All rows of a kind have one length, so no padding or
attention mask is involved. Losses are natural-log NLL per token; each number comes with a
standard error over rows (the delta method for ratios), so the precision of a small probe shows.
Logits are computed only at scored positions (``arc_encoder.scoring``), which keeps a 262k-token
vocabulary within memory at the default batch.
``probe_texts`` runs all three on raw held-out texts (`arc-encoder probe`, benchmarks/probe_real.py).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .config import ProbeConfig  # noqa: F401 - defined torch-free so that the CLI parser needs no torch
from .decoders import decoder_prefix_ids
from .scoring import IGNORE_INDEX, LogitHead, labelled_nll, logit_head

GATES = ("induction", "copy", "open_book_gain")


def ratio_and_se(num: torch.Tensor, den: torch.Tensor) -> tuple[float, float | None]:
    """mean(num) / mean(den) over paired rows, and its standard error by the delta method
    (``sd(num - r * den) / (sqrt(n) * mean(den))``); None for one row."""
    num, den = num.double(), den.double()
    r = float(num.mean() / den.mean())
    if num.numel() < 2:
        return r, None
    resid = num - r * den
    return r, float(resid.std(unbiased=True) / (math.sqrt(num.numel()) * abs(float(den.mean()))))


def mean_and_se(x: torch.Tensor) -> tuple[float, float | None]:
    x = x.double()
    return float(x.mean()), (float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else None)


@dataclass
class ProbeResult:
    """Mean NLL (nats/token) of each measured span, the gated ratios, and their standard errors."""

    induction_first: float  # first copy of the random sequence (tokens 2..L)
    induction_second: float  # second copy (tokens 2..L)
    induction_ratio: float  # second / first: the induction gate
    copy_first: float  # held-out passage, first time (tokens 2..L)
    copy_second: float  # the same passage again
    copy_ratio: float  # second / first: the copy gate
    closed_book: float  # continuation with no context
    open_book: float  # continuation after its preceding context
    open_book_gain: float  # closed_book - open_book, nats/token
    gain_ratio: float  # open_book_gain / closed_book: the gain gate
    induction_rows: int
    passages: int
    config: ProbeConfig
    prefix_ids: list[int] = field(default_factory=list)  # what every row started with
    induction_tokens: int = 0  # how many distinct ids the random sequences were drawn from
    se: dict[str, float | None] = field(default_factory=dict)  # standard error of each number above, by name

    def gates(self) -> dict[str, bool]:
        c = self.config
        return {
            "induction": self.induction_ratio <= c.induction_ratio_max,
            "copy": self.copy_ratio <= c.copy_ratio_max,
            "open_book_gain": self.gain_ratio >= c.gain_ratio_min,
        }

    @property
    def passed(self) -> bool:
        return all(self.gates().values())

    def _pm(self, name: str) -> str:
        se = self.se.get(name)
        return f" +- {se:.3f}" if se is not None else ""

    def failures(self) -> list[str]:
        """One line per missed gate, with the measured value and the bound."""
        c, out = self.config, []
        g = self.gates()
        if not g["induction"]:
            out.append(f"induction: second/first-copy loss {self.induction_ratio:.3f}{self._pm('induction_ratio')} > "
                       f"{c.induction_ratio_max} ({self.induction_first:.2f} -> {self.induction_second:.3f} nats/token)")
        if not g["copy"]:
            out.append(f"copy: second/first-copy loss {self.copy_ratio:.3f}{self._pm('copy_ratio')} > "
                       f"{c.copy_ratio_max} ({self.copy_first:.2f} -> {self.copy_second:.3f} nats/token)")
        if not g["open_book_gain"]:
            out.append(f"open-book gain {self.gain_ratio:.3f}{self._pm('gain_ratio')} of the closed-book loss < "
                       f"{c.gain_ratio_min} (closed {self.closed_book:.3f}, open {self.open_book:.3f} nats/token)")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gates"] = self.gates()
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        return (f"induction {self.induction_first:.2f}->{self.induction_second:.3f} "
                f"(ratio {self.induction_ratio:.3f}{self._pm('induction_ratio')}), "
                f"copy {self.copy_first:.2f}->{self.copy_second:.3f} (ratio {self.copy_ratio:.3f}{self._pm('copy_ratio')}), "
                f"open-book {self.closed_book:.3f}->{self.open_book:.3f} "
                f"(gain {self.open_book_gain:.3f} nats, {self.gain_ratio:.3f}{self._pm('gain_ratio')} of closed)"
                f"{'' if self.passed else ' FAILED: ' + '; '.join(self.failures())}")


@torch.no_grad()
def span_nll(model: nn.Module, rows: torch.Tensor, spans: dict[str, tuple[int, int]], batch_size: int = 16,
             head: LogitHead | None | bool = True) -> dict[str, torch.Tensor]:
    """Per-row mean NLL [rows] of the tokens ``rows[:, a:b]`` of each named span ``(a, b)``, a >= 1.

    Only the spans' tokens are scored (``scoring.labelled_nll``: logits exist only there). ``head`` as
    there. Rows are scored in eval mode; the model's training flag is restored afterwards.
    """
    if any(a < 1 or b > rows.shape[1] or b <= a for a, b in spans.values()):
        raise ValueError(f"spans must lie within tokens 1..{rows.shape[1]} of a row, got {spans}")
    device = next(model.parameters()).device
    on = torch.zeros(rows.shape[1], dtype=torch.bool)
    for a, b in spans.values():
        on[a:b] = True
    was_training = model.training
    model.eval()
    nll = []
    try:
        for start in range(0, rows.shape[0], batch_size):
            ids = rows[start : start + batch_size].to(device)
            labels = ids.masked_fill(~on.to(device), IGNORE_INDEX)
            nll.append(labelled_nll(model, labels, input_ids=ids, head=head).cpu())  # [b, s-1]: [:, j-1] scores token j
    finally:
        model.train(was_training)
    out = torch.cat(nll)
    return {name: out[:, a - 1 : b - 1].mean(1) for name, (a, b) in spans.items()}


@torch.no_grad()
def token_nll(model: nn.Module, ids: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """NLL of ids[:, 1:] given everything before it: [rows, n - 1], float32 on the CPU (every token scored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return torch.cat([labelled_nll(model, ids[i : i + batch_size].to(device),
                                       input_ids=ids[i : i + batch_size].to(device)).cpu()
                          for i in range(0, ids.shape[0], batch_size)])
    finally:
        model.train(was_training)


def random_rows(pool: torch.Tensor, length: int, rows: int, seed: int = 0) -> torch.Tensor:
    """[rows, length] token ids drawn uniformly (with replacement, seeded) from the 1-D id ``pool``."""
    pool = torch.as_tensor(pool, dtype=torch.long).flatten()
    if len(pool) < 2:
        raise ValueError(f"random induction tokens need at least 2 distinct token ids to draw from, got {len(pool)}")
    gen = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (rows, length), generator=gen)]


def token_pool(config: ProbeConfig, passages: torch.Tensor, vocab_size: int | None, exclude: Sequence[int]) -> torch.Tensor:
    """The ids random induction tokens are drawn from (sorted): the passages' distinct ids ("text") or
    ``range(vocab_size)`` ("vocabulary"), minus ``exclude`` (special tokens)."""
    if config.induction_tokens == "text":
        ids = torch.unique(passages)
    else:
        if vocab_size is None:
            raise ValueError('induction_tokens="vocabulary" needs the vocabulary size')
        ids = torch.arange(vocab_size)
    drop = torch.as_tensor(list(exclude), dtype=torch.long)
    return ids[~torch.isin(ids, drop)] if len(drop) else ids


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


def _with_prefix(prefix: Sequence[int], *parts: torch.Tensor) -> torch.Tensor:
    n = parts[0].shape[0]
    pre = torch.as_tensor(list(prefix), dtype=torch.long).reshape(1, -1).expand(n, -1)
    return torch.cat([pre, *parts], dim=1)


def _copies(model, seqs: torch.Tensor, prefix: Sequence[int], batch_size: int, head) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean NLL of copy 1 and copy 2 of prefix + s + s, each over tokens 2..L of its copy."""
    p, length = len(prefix), seqs.shape[1]
    out = span_nll(model, _with_prefix(prefix, seqs, seqs),
                   {"first": (p + 1, p + length), "second": (p + length + 1, p + 2 * length)}, batch_size, head)
    return out["first"], out["second"]


def _checked_head(model: nn.Module, sample: torch.Tensor) -> LogitHead | None:
    """The decoder's body + head when they reproduce its own logits on a few tokens, else None (full forward)."""
    head = logit_head(model)
    if head is None:
        return None
    was_training = model.training
    model.eval()
    try:
        ok = head.matches(model, sample.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
    if not ok:
        warnings.warn(f"{type(model).__name__}: its output head applied to its hidden states does not reproduce its "
                      "logits (an unknown logit transform); scoring with full forward passes (slower, more memory)",
                      stacklevel=3)
        return None
    return head


def probe_decoder(
    model: nn.Module,
    passages: torch.Tensor,
    prefix_ids: Sequence[int],
    vocab_size: int | None = None,
    exclude_ids: Sequence[int] = (),
    config: ProbeConfig | None = None,
) -> ProbeResult:
    """Run the three measurements. ``passages``: [n, >= config.window_len] held-out token ids;
    ``prefix_ids``: what every row starts with (``decoder_prefix_ids``).

    ``exclude_ids`` (special tokens) are never drawn for the random induction sequences;
    ``vocab_size`` is needed only for ``config.induction_tokens == "vocabulary"``.
    """
    config = config or ProbeConfig()
    if passages.dim() != 2 or passages.shape[1] < config.window_len:
        raise ValueError(f"passages must be [n, >= {config.window_len}] token ids, got {tuple(passages.shape)}")
    prefix = [int(i) for i in prefix_ids]
    bs = config.batch_size
    head = _checked_head(model, _with_prefix(prefix, passages[:1, :8]))
    pool = token_pool(config, passages, vocab_size, exclude_ids)
    rand = random_rows(pool, config.induction_len, config.induction_rows, config.seed)
    ind1, ind2 = _copies(model, rand, prefix, bs, head)

    # One row per passage serves copy and open book: prefix + window + window[:copy_len]. Causal
    # attention makes its first window tokens exactly the open-book row, and the passage's second
    # copy reads the first one window_len tokens back.
    p, w, c, t, n = len(prefix), config.window_len, config.context_len, config.continuation_len, config.copy_len
    skip = 0 if prefix else 1  # without a prefix, nothing in the closed-book row predicts its first token
    window = passages[:, :w]
    both = span_nll(model, _with_prefix(prefix, window, window[:, :n]),
                    {"first": (p + 1, p + n), "second": (p + w + 1, p + w + n), "open": (p + c + skip, p + c + t)},
                    bs, head)
    cp1, cp2, opened = both["first"], both["second"], both["open"]
    closed = span_nll(model, _with_prefix(prefix, passages[:, c : c + t]), {"cont": (p + skip, p + t)}, bs, head)["cont"]

    se = {}
    values = {}
    for name, x in (("induction_first", ind1), ("induction_second", ind2), ("copy_first", cp1),
                    ("copy_second", cp2), ("closed_book", closed), ("open_book", opened),
                    ("open_book_gain", closed - opened)):
        values[name], se[name] = mean_and_se(x)
    for name, num, den in (("induction_ratio", ind2, ind1), ("copy_ratio", cp2, cp1),
                           ("gain_ratio", closed - opened, closed)):
        values[name], se[name] = ratio_and_se(num, den)
    return ProbeResult(**values, induction_rows=config.induction_rows, passages=passages.shape[0], config=config,
                       prefix_ids=prefix, induction_tokens=len(pool), se=se)


def text_windows(tokenizer, texts: Sequence[str], config: ProbeConfig, count: int | None = None) -> torch.Tensor:
    """Held-out passages for the probe: one window of ``config.window_len`` decoder tokens per text long
    enough (`heldout_windows`), up to ``count`` (default ``config.passages``); the error says how long a
    text must be."""
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts if isinstance(t, str) and t.strip()]
    if not docs:
        raise ValueError("no text to probe with")
    longest = max(len(d) for d in docs)
    if longest < config.window_len:
        raise ValueError(f"no text has the {config.window_len} decoder tokens a probe passage needs (the longest has "
                         f"{longest}); give longer held-out texts")
    return heldout_windows(docs, config.window_len, count or config.passages, seed=config.seed)


def probe_texts(model: nn.Module, tokenizer, texts: Sequence[str], config: ProbeConfig | None = None,
                count: int | None = None) -> ProbeResult:
    """The three measurements on raw held-out ``texts`` with ``model``'s own ``tokenizer`` (and its prefix)."""
    config = config or ProbeConfig()
    windows = text_windows(tokenizer, texts, config, count)
    vocab = min(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    return probe_decoder(model, windows, decoder_prefix_ids(tokenizer), vocab, tokenizer.all_special_ids, config)
