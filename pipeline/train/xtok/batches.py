"""Training batches for a student with another tokenizer: cache rows re-tokenised, with the aligned pairs.

:class:`CrossTokenizerDataset` is the cache's :class:`~kdpipe.pipeline.train.dataset.CacheDataset`
(same row order, rank shares, resume and integrity checks) whose rows are also seen through the
student's tokenizer (:func:`~.align.student_row`). A batch holds

- the student's side, padded on the right to the batch's longest student row: ``input_ids [B, L]``,
  ``labels [B, L]`` (CE targets, IGNORE elsewhere), ``mask [B, L]`` (real student tokens),
  ``label_bytes [B, L]`` (bytes of the text each label token covers, for bits per byte);
- the teacher's cached targets as the cache gives them, ``[B, P, ...]``, with its ids and mask renamed
  ``teacher_input_ids`` and ``teacher_mask``;
- the aligned pairs as flat indices: ``kd_student_index [M]`` into ``B * L`` and ``kd_teacher_index [M]``
  into ``B * P``.
"""

from __future__ import annotations

import numpy as np
import torch

from kdpipe.pipeline.cache.text_spans import row_text
from kdpipe.pipeline.train.dataset import CacheDataset
from kdpipe.pipeline.train.xtok.align import IGNORE, StudentTokenizer, student_row


class CrossTokenizerDataset(CacheDataset):
    """A :class:`CacheDataset` whose batches carry the student's tokens (module doc)."""

    @classmethod
    def around(cls, dataset: CacheDataset, student: StudentTokenizer, *, max_len: int | None,
               pad_id: int) -> "CrossTokenizerDataset":
        """The same rows, order and share as ``dataset``, re-tokenised for ``student``."""
        out = cls.__new__(cls)
        out.__dict__.update(dataset.__dict__)
        out.student, out.max_len, out.pad_id = student, max_len, int(pad_id)
        out.chat = dataset.cache.schema.mask_meaning == "next-token-target"
        return out

    def to_tensors(self, raw: dict, row: int) -> dict[str, torch.Tensor]:
        out = super().to_tensors(raw, row)
        text = row_text(self.cache.schema, raw)
        teacher_mask = np.asarray(raw["mask"], bool)
        student = student_row(text.text, text.token_spans, text.segments, teacher_mask, self.student, chat=self.chat,
                              teacher_real=None if self.chat else teacher_mask, max_len=self.max_len)
        out["teacher_input_ids"], out["teacher_mask"] = out.pop("input_ids"), out.pop("mask")
        label_bytes = np.zeros_like(student.byte_lengths)
        label_bytes[:-1] = np.where(student.labels[:-1] != IGNORE, student.byte_lengths[1:], 0)
        out.update(input_ids=torch.from_numpy(student.input_ids), labels=torch.from_numpy(student.labels),
                   label_bytes=torch.from_numpy(label_bytes),
                   kd_student=torch.from_numpy(student.student_positions),
                   kd_teacher=torch.from_numpy(student.teacher_positions))
        return out

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        positions = items[0]["teacher_mask"].shape[0]
        student_keys = {"input_ids": self.pad_id, "labels": IGNORE, "label_bytes": 0}
        batch = {key: torch.stack([_pad(item[key], longest, fill) for item in items])
                 for key, fill in student_keys.items()}
        batch["mask"] = torch.stack([_pad(torch.ones(len(item["input_ids"]), dtype=torch.bool), longest, False)
                                     for item in items])
        batch["kd_student_index"] = torch.cat([item["kd_student"] + b * longest for b, item in enumerate(items)])
        batch["kd_teacher_index"] = torch.cat([item["kd_teacher"] + b * positions for b, item in enumerate(items)])
        skip = {*student_keys, "kd_student", "kd_teacher"}
        batch.update({key: torch.stack([item[key] for item in items]) for key in items[0] if key not in skip})
        return batch


def _pad(values: torch.Tensor, length: int, fill) -> torch.Tensor:
    return torch.cat([values, values.new_full((length - len(values),), fill)])
