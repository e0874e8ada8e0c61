"""What ``train-student`` does with a student whose tokenizer differs from the cache's.

:func:`for_student` decides it (the two tokenizers' fingerprints differ) and refuses what cannot work:
a cache that records no text, a teacher tokenizer that cannot be loaded, a tokenizer whose tokens'
bytes cannot be told, a student vocabulary smaller than its tokenizer. :class:`CrossTokenizerRun` then
gives the Trainer its datasets (:mod:`.batches`), the loss of a batch and the held-out metrics.

Loss of a batch: ``alpha * kd + (1 - alpha) * ce`` with ``ce`` the student's own next-token CE over its
CE targets and ``kd`` the ``--cross-tokenizer-loss`` (:mod:`.losses`) at the aligned positions only.
The student's logits are computed in full, ``[B, L, V_s]`` (CE needs every position; the fused
lm-head path of a same-tokenizer run is not used).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from kdpipe.pipeline.cache.text_spans import has_text
from kdpipe.pipeline.errors import ConfigError, DataError
from kdpipe.pipeline.models.tokenizers import load_tokenizer, tokenizer_fingerprint
from kdpipe.pipeline.train import metrics
from kdpipe.pipeline.train.losses import hard_label_ce
from kdpipe.pipeline.train.targets import IGNORE, TeacherTargets, teacher_targets
from kdpipe.pipeline.train.xtok.align import StudentTokenizer
from kdpipe.pipeline.train.xtok.batches import CrossTokenizerDataset
from kdpipe.pipeline.train.xtok.losses import (CROSS_TOKENIZER_LOSSES, GROUP_LOSSES, cross_tokenizer_loss, exact_map_loss,
                                               uld_loss)
from kdpipe.pipeline.train.xtok.vocab_map import first_byte_groups, prefix_groups, prefix_token_map, shared_token_map

PROBE = "Enter VIOLA, a Captain, and Sailors.  Œdipus' ﬁne café\n"  # case, spaces, a ligature, accents
IMPLEMENTATION = ("cross-tokenizer: full student logits [B, L_s, V_s] at every student position (CE needs them), "
                  "KD at the positions aligned by byte ends only")


def for_student(cache, student, *, cache_name: str, loss: str,
                teacher_tokenizer_path: str | None) -> "CrossTokenizerRun | None":
    """The cross-tokenizer run for ``student`` on ``cache``, or None when it has the cache's tokenizer."""
    if loss not in CROSS_TOKENIZER_LOSSES:
        raise ConfigError(f"unknown --cross-tokenizer-loss {loss!r}; use one of {', '.join(CROSS_TOKENIZER_LOSSES)}")
    recorded = cache.manifest.get("tokenizer")
    tokenizer = student.tokenizer
    if not recorded or tokenizer is None or tokenizer_fingerprint(tokenizer)["sha256"] == recorded["sha256"]:
        return None
    if cache.schema.task != "causal-lm" or not has_text(cache.schema):
        raise ConfigError(f"the student's tokenizer differs from the one cache {cache_name} was made with, and the "
                          "cache records no text; re-capture it with this kdpipe (cache-teacher) to train a student "
                          "with another tokenizer, or train with the teacher's tokenizer (--tokenizer DIR)")
    if not cache.schema.top_k:
        raise ConfigError(f"cache {cache_name} holds only draws (no top-k), which cross-tokenizer training cannot map "
                          "onto the student's tokens; capture it with --top-k")
    teacher = load_tokenizer(teacher_tokenizer_path, required=False)
    if teacher is None or tokenizer_fingerprint(teacher)["sha256"] != recorded["sha256"]:
        raise ConfigError(f"cross-tokenizer training needs the teacher's tokenizer, and the one cache {cache_name} "
                          f"names ({teacher_tokenizer_path}) cannot be loaded or has changed; run where the teacher's "
                          "path in the manifest holds its tokenizer")
    if student.vocab_size < len(tokenizer):
        raise ConfigError(f"the student's vocabulary ({student.vocab_size}) does not cover the {len(tokenizer)} tokens "
                          "of its tokenizer; give the student a vocab_size of at least that")
    try:  # the maps and the probe refuse a tokenizer whose bytes cannot be matched to the text
        teacher_vocab = int(cache.manifest["capture"]["teacher_vocab_size"])
        vocab_map = shared_token_map(teacher, tokenizer, teacher_vocab_size=teacher_vocab)
        student_group = None
        if loss == "prefix-map":
            loss_map = prefix_token_map(teacher, tokenizer, teacher_vocab_size=teacher_vocab).teacher_to_student
        elif loss in GROUP_LOSSES:
            groups = (prefix_groups if loss == "prefix-groups" else first_byte_groups)(
                teacher, tokenizer, teacher_vocab_size=teacher_vocab)
            loss_map, student_group = groups.teacher_group, torch.from_numpy(groups.student_group)
        else:
            loss_map = vocab_map.teacher_to_student
        config = getattr(student.model, "config", None)
        max_len = getattr(config, "max_position_embeddings", None)
        student_tokenizer = StudentTokenizer.of(tokenizer, vocab_map.student_bytes)
        student_tokenizer.segment(PROBE.encode(), 0)  # a normalising tokenizer is refused here, not mid-run
        if cache.schema.mask_meaning == "next-token-target":  # a chat cache: the student's own template
            student_tokenizer.template("user")
    except (ConfigError, DataError) as exc:
        raise ConfigError(f"the student's tokenizer differs from the one the cache was made with, and cannot "
                          f"train across tokenizers: {exc}") from None
    return CrossTokenizerRun(loss, torch.from_numpy(loss_map), student_tokenizer, max_len,
                             shared=vocab_map.shared, teacher_tokenizer=teacher_tokenizer_path,
                             exact_map=torch.from_numpy(vocab_map.teacher_to_student), student_group=student_group)


@dataclasses.dataclass
class CrossTokenizerRun:
    loss_name: str
    teacher_to_student: torch.Tensor  # [V_t] int64: the loss's map (exact, prefix, or the teacher's groups), -1: none
    student: StudentTokenizer
    max_len: int | None
    shared: int  # teacher ids with a student twin
    teacher_tokenizer: str | None = None  # where the teacher's tokenizer was loaded from
    exact_map: torch.Tensor | None = None  # [V_t] the exact map, for the held-out KL (default: teacher_to_student)
    implementation: str = IMPLEMENTATION
    student_group: torch.Tensor | None = None  # [V_s] int64: the student's groups for a group loss, -1: none

    def dataset(self, dataset) -> CrossTokenizerDataset:
        """``dataset``'s rows re-tokenised for the student."""
        tokenizer = self.student.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.student.eos_id
        return CrossTokenizerDataset.around(dataset, self.student, max_len=self.max_len, pad_id=pad)

    def record(self, dataset, *, rows: int = 64) -> dict:
        """What run.json records of the run (``cross_tokenizer``): the loss, both tokenizers, the shared ids,
        and the share of student positions aligned over the first ``rows`` training rows of its first epoch."""
        aligned = counted = seen = 0
        for batch in dataset:
            kd_positions = torch.zeros(batch["labels"].numel(), dtype=torch.bool)
            kd_positions[batch["kd_student_index"]] = True
            aligned += int(kd_positions.sum())
            counted += int(((batch["labels"].reshape(-1) != IGNORE) | kd_positions).sum())
            seen += len(batch["labels"])
            if seen >= rows:
                break
        tokenizer = self.student.tokenizer
        return {"loss": self.loss_name, "teacher_tokenizer": self.teacher_tokenizer,
                "student_tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
                "student_tokenizer_sha256": tokenizer_fingerprint(tokenizer)["sha256"],
                "shared_teacher_ids": self.shared, "aligned_share": aligned / max(counted, 1),
                "aligned_share_rows": seen}

    def aligned_targets(self, schema, batch: dict, *, temperature: float) -> TeacherTargets:
        """The teacher's targets at the batch's aligned teacher positions (``[M]`` rows)."""
        teacher_batch = {key: batch[key] for key in ("topk_ids", "topk_logits", "logsumexp", "tail_logprob")}
        teacher_batch.update(input_ids=batch["teacher_input_ids"], mask=batch["teacher_mask"])
        flat = teacher_targets(teacher_batch, temperature_index=schema.temperature_index(temperature),
                               temperature=temperature, task=schema.task, mask_meaning=schema.mask_meaning,
                               renormalize=schema.value_dtype == "quantized")
        rows = batch["kd_teacher_index"]
        return TeacherTargets(flat.topk_ids[rows], flat.topk_logprobs[rows], flat.tail_logprob[rows],
                              flat.kd_mask[rows], flat.labels[rows], flat.ce_mask[rows], temperature=temperature)

    def objective(self, schema, batch: dict, student_logits: torch.Tensor, *, temperature: float, alpha: float,
                  kind: str) -> dict:
        """``{"loss", "kd", "ce"}`` of a batch from the student's logits ``[B, L, V_s]``."""
        flat = student_logits.reshape(-1, student_logits.shape[-1])
        zero = flat.new_zeros((), dtype=torch.float32)
        ce = zero if alpha == 1.0 else hard_label_ce(flat, batch["labels"].reshape(-1))
        kd = zero
        if alpha > 0.0:
            self._maps_to(flat.device)
            targets = self.aligned_targets(schema, batch, temperature=temperature)
            kd = cross_tokenizer_loss(self.loss_name, flat[batch["kd_student_index"]], targets.topk_ids,
                                      targets.topk_logprobs, targets.tail_logprob, self.teacher_to_student,
                                      temperature=temperature, kind=kind, student_group=self.student_group)
        return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce}

    def _maps_to(self, device) -> None:
        """The vocabulary maps on the student's device, moved once rather than at every step."""
        if self.teacher_to_student.device != device:
            self.teacher_to_student = self.teacher_to_student.to(device)
            self.student_group = None if self.student_group is None else self.student_group.to(device)

    @torch.no_grad()
    def evaluate(self, schema, batches, student_logits, *, temperature: float) -> dict:
        """Held-out metrics over ``batches``: CE per student token, bits per byte of the labels' text,
        the exact-map KL and ULD at the aligned positions (at ``temperature``, without the T^2 factor),
        and the share of student positions aligned (of those carrying CE or KD)."""
        ce, kl, uld = metrics.Mean(), metrics.Mean(), metrics.Mean()
        ce_nats, label_bytes, aligned, counted = 0.0, 0, 0, 0
        for batch in batches:
            logits = student_logits(batch)
            flat = logits.reshape(-1, logits.shape[-1]).float()
            labels = batch["labels"].reshape(-1)
            valid = labels != IGNORE
            token_ce = torch.nn.functional.cross_entropy(flat[valid], labels[valid], reduction="sum")
            ce.add(token_ce, int(valid.sum()))
            ce_nats += float(token_ce)
            label_bytes += int(batch["label_bytes"].sum())
            kd_positions = torch.zeros_like(valid)
            kd_positions[batch["kd_student_index"]] = True
            aligned += int(kd_positions.sum())
            counted += int((valid | kd_positions).sum())
            if len(batch["kd_student_index"]):
                targets = self.aligned_targets(schema, batch, temperature=temperature)
                at = flat[batch["kd_student_index"]]
                m = len(batch["kd_student_index"])
                exact = self.teacher_to_student if self.exact_map is None else self.exact_map
                kl.add(exact_map_loss(at, targets.topk_ids, targets.topk_logprobs, targets.tail_logprob,
                                      exact, temperature=temperature) * m / temperature**2, m)
                uld.add(uld_loss(at, targets.topk_logprobs, targets.tail_logprob, temperature=temperature)
                        * m / temperature**2, m)
        return {"ce": ce.value, "bits_per_byte": ce_nats / (math.log(2) * max(label_bytes, 1)),
                "kl_exact_map": kl.value, "uld": uld.value, "aligned_share": aligned / max(counted, 1),
                "shared_teacher_ids": self.shared, "temperature": temperature}
