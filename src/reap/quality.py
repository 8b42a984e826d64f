"""Evidence beyond raw scores, as pure functions of what `reap eval` measured: paired recovery with a 95 %
interval (from lm-eval's per-document samples), truncated and empty generations, and token-level agreement
of two models' next-token distributions (from top-k prompt logprobs).

Estimators (the card and the README say the same):
- Paired recovery. The two models answered the same documents (same task, limit, few-shot count, metric and
  item hashes). With per-document scores q_i (W4A16) and s_i (source), n documents: recovery R = mean(q) /
  mean(s); its standard error by the delta method, sd(q_i - R s_i) / (sqrt(n) mean(s)); the 95 % interval is
  R +- 1.96 se. The difference is within noise when the 95 % interval of the mean paired difference
  d_i = q_i - s_i (mean(d) +- 1.96 sd(d) / sqrt(n)) contains 0.
- KL. At each position the server returns the top-k next tokens of each model. Both distributions are coarsened
  to the same cells: every token both lists contain, and one bucket holding the rest of the mass (1 minus the
  listed tokens' probabilities). KL(source || W4A16) of the coarsened pair never exceeds the true KL (the
  data-processing inequality), is 0 for identical models, and is exact when the lists cover the vocabulary.
- Means over positions are token-weighted; their standard errors treat each document as one cluster (positions
  of one text are not independent).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from reap.rundir import digest

Z95 = 1.959964
FLAG_RATE = 0.01  # a truncation or empty-answer rate above this is flagged in the card
MEASURE = ("metric", "limit", "num_fewshot", "model_type", "items")  # what makes two results the same measurement
MIN_PROB = 1e-12  # floor of a bucket's probability (float rounding can leave it at or below 0)


def item_key(sample: dict[str, Any]) -> str:
    """One document of a task as lm-eval logged it: its id and the hashes of the document, prompt (with its
    few-shot context) and target."""
    return f"{sample['doc_id']}:{sample['doc_hash']}:{sample['prompt_hash']}:{sample['target_hash']}"


def of_filter(samples: Iterable[dict[str, Any]], filter_: str) -> list[dict[str, Any]]:
    """The samples of one filter (lm-eval logs each document once per filter)."""
    return [s for s in samples if s.get("filter", "none") == filter_]


def items_digest(samples: list[dict[str, Any]]) -> str:
    """A fingerprint of the documents scored: two results are paired only when theirs are equal."""
    return digest(sorted(item_key(s) for s in samples))


def item_scores(samples: list[dict[str, Any]], metric: str) -> dict[str, float] | None:
    """{document: score} for a metric lm-eval scores per document (a number); None for corpus-level metrics
    (lm-eval logs their per-document inputs, not a score)."""
    scores = {}
    for s in samples:
        value = s.get(metric)
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)):
            return None
        scores[item_key(s)] = float(value)
    return scores


def _sd(xs: list[float]) -> float:
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def paired_recovery(quantized: dict[str, float], source: dict[str, float]) -> dict[str, Any] | None:
    """Recovery and the paired difference on the documents both scored (module docstring); None when they are
    not the same documents or fewer than two."""
    if set(quantized) != set(source) or len(quantized) < 2:
        return None
    keys = sorted(quantized)
    q = [quantized[k] for k in keys]
    s = [source[k] for k in keys]
    n = len(keys)
    q_mean, s_mean = sum(q) / n, sum(s) / n
    d = [a - b for a, b in zip(q, s, strict=True)]
    diff, diff_se = q_mean - s_mean, _sd(d) / math.sqrt(n)
    out: dict[str, Any] = {
        "n": n,
        "diff": diff,
        "diff_se": diff_se,
        "diff_ci95": [diff - Z95 * diff_se, diff + Z95 * diff_se],
        "within_noise": abs(diff) <= Z95 * diff_se,
        "recovery": None,
        "recovery_se": None,
        "recovery_ci95": None,
    }
    if s_mean > 0:
        r = q_mean / s_mean
        se = _sd([a - r * b for a, b in zip(q, s, strict=True)]) / (math.sqrt(n) * s_mean)
        out.update(recovery=r, recovery_se=se, recovery_ci95=[r - Z95 * se, r + Z95 * se])
    return out


def generation_checks(samples: list[dict[str, Any]], n_tokens, default_limit: int) -> dict[str, Any]:
    """Responses of a generation task that reached the generation limit (their length in tokens, `n_tokens`
    of the text, is at least the limit: the stop sequence never came) or are blank. The limit is the one
    each request carried (`max_tokens`, else `max_gen_toks`, else lm-eval's default for API models)."""
    truncated = empty = 0
    limits = set()
    for s in samples:
        gen = s["arguments"][0][1] if len(s["arguments"][0]) > 1 else {}
        limit = int(gen.get("max_tokens", gen.get("max_gen_toks", default_limit)))
        limits.add(limit)
        text = s["resps"][0][0] or ""
        empty += not text.strip()
        truncated += n_tokens(text) >= limit
    n = len(samples)
    return {
        "max_gen_toks": min(limits) if limits else default_limit,
        "n": n,
        "truncated": truncated,
        "empty": empty,
        "truncated_rate": truncated / n if n else 0.0,
        "empty_rate": empty / n if n else 0.0,
    }


def flagged(generation: dict[str, Any] | None) -> bool:
    return bool(generation) and max(generation["truncated_rate"], generation["empty_rate"]) > FLAG_RATE


def coarse_kl(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(P || Q) in nats of two next-token distributions given as {token id: logprob} of their top-k lists,
    coarsened to the tokens both list plus one bucket for the rest (module docstring)."""
    both = p.keys() & q.keys()
    kl, p_listed, q_listed = 0.0, 0.0, 0.0
    for t in both:
        pt, qt = math.exp(p[t]), math.exp(q[t])
        p_listed += pt
        q_listed += qt
        kl += pt * (p[t] - q[t])
    p_rest, q_rest = max(1.0 - p_listed, 0.0), max(1.0 - q_listed, MIN_PROB)
    if p_rest > MIN_PROB:
        kl += p_rest * math.log(p_rest / q_rest)
    return max(kl, 0.0)


def top1(dist: dict[int, float]) -> int:
    return min(dist, key=lambda t: (-dist[t], t))


def clustered_mean(per_doc: list[list[float]]) -> tuple[float, float | None]:
    """Token-weighted mean over every position of every document, and its standard error with documents as
    clusters (None with fewer than two documents)."""
    docs = [xs for xs in per_doc if xs]
    total = sum(len(xs) for xs in docs)
    mean = sum(sum(xs) for xs in docs) / total
    g = len(docs)
    if g < 2:
        return mean, None
    resid = sum((sum(xs) - len(xs) * mean) ** 2 for xs in docs)
    return mean, math.sqrt(g / (g - 1) * resid) / total


def compare_logprobs(source: list[dict[str, Any]], quantized: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-level agreement of two captures of the same texts (evaluate.capture_logprobs): mean KL(source ||
    quantized) per position, top-1 agreement, and each side's perplexity of the text, on the documents whose
    token ids are the same on both sides (the others are counted, not compared)."""
    kl_docs, agree_docs, nll_src, nll_q = [], [], [], []
    mismatched = 0
    for a, b in zip(source, quantized, strict=True):
        if a["tokens"] != b["tokens"]:
            mismatched += 1
            continue
        pa = [dict(top) for top in a["top"]]
        pb = [dict(top) for top in b["top"]]
        kl_docs.append([coarse_kl(x, y) for x, y in zip(pa, pb, strict=True)])
        agree_docs.append([float(top1(x) == top1(y)) for x, y in zip(pa, pb, strict=True)])
        nll_src.append([-lp for lp in a["logprobs"]])
        nll_q.append([-lp for lp in b["logprobs"]])
    if not kl_docs:
        return {"docs": 0, "mismatched_docs": mismatched}
    kl, kl_se = clustered_mean(kl_docs)
    agree, agree_se = clustered_mean(agree_docs)
    return {
        "docs": len(kl_docs),
        "positions": sum(len(x) for x in kl_docs),
        "mismatched_docs": mismatched,
        "kl_mean": kl,
        "kl_se": kl_se,
        "kl_max": max(max(x) for x in kl_docs if x),
        "top1_agreement": agree,
        "top1_agreement_se": agree_se,
        "perplexity_source": math.exp(clustered_mean(nll_src)[0]),
        "perplexity_quantized": math.exp(clustered_mean(nll_q)[0]),
    }
