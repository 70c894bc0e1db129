"""Turn-taking metrics: accuracy, per-class and macro F1, the confusion matrix, and the two errors
practitioners watch: the false cut-off rate (an INCOMPLETE turn judged COMPLETE, so the agent
barges in) and the backchannel take-over rate (a BACKCHANNEL judged COMPLETE, so the agent takes a
turn the user never gave). Also word error rate for transcripts."""
from .tokenizer import TAGS


def classification_report(labels: list[str], preds: list[str]) -> dict:
    """confusion[true][pred] counts over the tags; precision/recall/F1 per tag (0 where undefined);
    macro F1 is the unweighted mean over the three tags, present in the data or not."""
    classes = list(TAGS)
    confusion = {t: {p: 0 for p in classes} for t in classes}
    for t, p in zip(labels, preds, strict=True):
        if t not in confusion or p not in confusion:
            raise ValueError(f"label {t!r} or prediction {p!r} is not one of {classes}")
        confusion[t][p] += 1
    per_class = {}
    for c in classes:
        tp = confusion[c][c]
        predicted = sum(confusion[t][c] for t in classes)
        actual = sum(confusion[c].values())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    n = len(labels)
    report = {
        "n": n,
        "accuracy": sum(confusion[c][c] for c in classes) / n if n else 0.0,
        "macro_f1": sum(v["f1"] for v in per_class.values()) / len(classes),
        "per_class": per_class,
        "confusion": confusion,
    }
    complete, incomplete, backchannel = TAGS

    def rate(true):
        total = sum(confusion[true].values())
        return confusion[true][complete] / total if total else 0.0

    report["false_cutoff_rate"] = rate(incomplete)
    report["backchannel_takeover_rate"] = rate(backchannel)
    return report


def format_report(r: dict) -> str:
    classes = list(r["confusion"])
    short = [c.strip("<>") for c in classes]
    w = max(len(s) for s in short) + 2
    lines = [f"n={r['n']}  accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}"]
    if "false_cutoff_rate" in r:
        lines.append(f"false cut-off rate (INCOMPLETE -> COMPLETE) {r['false_cutoff_rate']:.4f}  "
                     f"backchannel take-over rate (BACKCHANNEL -> COMPLETE) {r['backchannel_takeover_rate']:.4f}")
    lines.append(f"{'':{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for c, s in zip(classes, short):
        v = r["per_class"][c]
        lines.append(f"{s:{w}}{v['precision']:10.4f}{v['recall']:10.4f}{v['f1']:10.4f}{v['support']:10d}")
    lines.append("confusion (rows: true, columns: predicted)")
    lines.append(f"{'':{w}}" + "".join(f"{s:>{w}}" for s in short))
    for c, s in zip(classes, short):
        lines.append(f"{s:{w}}" + "".join(f"{r['confusion'][c][p]:>{w}d}" for p in classes))
    return "\n".join(lines)


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(Levenshtein distance between the word sequences, number of reference words)."""
    r, h = ref.split(), hyp.split()
    prev = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1], len(r)


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus word error rate: total edits / total reference words."""
    errors = words = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        e, n = word_errors(ref, hyp)
        errors, words = errors + e, words + n
    return errors / words if words else 0.0
