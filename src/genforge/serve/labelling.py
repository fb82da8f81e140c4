"""What a labelling deployment adds to generated text: the watermark and the explicit label.

`Labelling` is the server's configuration (`genforge serve --watermark KEY [--watermark-gamma G]
[--watermark-delta D] [--label-text TEXT]`); the service asks it, per request, for

- the `TextWatermark` each sequence is sampled with: the deployment's key, or the tenant's own key
  from the request's `"watermark": {"key": "..."}` (the deployment's gamma and delta either way). A
  request can change the key, never turn the watermark off; on a server that does not watermark the
  field is a 400 (it would otherwise be silently ignored, and the tenant believe its text marked);
- the public description (scheme, gamma, delta, key_id) that goes in every response's `watermark`
  field and its `x-genforge-watermark` header, streams included;
- the label text appended to every choice's text (in a stream, the last content chunk);
- the part of the semantic cache's key that keeps answers of different keys (or of an unmarked
  deployment) apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from genforge.common.errors import GenforgeError
from genforge.models.watermark import TextWatermark

HEADER = "x-genforge-watermark"


@dataclass(frozen=True)
class Labelling:
    watermark: TextWatermark | None = None
    label_text: str | None = None

    @property
    def active(self) -> bool:
        return self.watermark is not None or bool(self.label_text)

    def for_request(self, req: Any) -> TextWatermark | None:
        """The watermark this request's sequences are sampled with (None: the deployment does not mark)."""
        asked = getattr(req, "watermark", None)
        if self.watermark is None:
            if asked is not None:
                raise GenforgeError("watermark: this server does not watermark its output, so a request key would "
                                    "be ignored; leave the field out, or start the server with --watermark",
                                    param="watermark")
            return None
        if asked is None:
            return self.watermark
        return TextWatermark.from_secret(asked.key, gamma=self.watermark.gamma, delta=self.watermark.delta)

    @staticmethod
    def describe(wm: TextWatermark | None) -> dict | None:
        """The response's `watermark` field."""
        return wm.describe() if wm is not None else None

    @staticmethod
    def headers(wm: TextWatermark | None) -> dict[str, str]:
        return {HEADER: wm.header()} if wm is not None else {}

    def label(self) -> str:
        return self.label_text or ""

    def cache_part(self, req: Any) -> dict | None:
        """What the cache key must hold so that an answer is only ever replayed to a request that would
        have been generated (and labelled) the same way: the key's public id, gamma, delta, the label."""
        wm = self.for_request(req)
        if wm is None and not self.label_text:
            return None
        return {"watermark": wm.describe() if wm is not None else None, "label": self.label_text}

    def start_line(self) -> str:
        parts = []
        if self.watermark is not None:
            w = self.watermark
            parts.append(f"watermark=kgw(gamma {w.gamma:g}, delta {w.delta:g}, key-id {w.key_id})")
        if self.label_text:
            parts.append(f"label={self.label_text!r}")
        return " ".join(parts)
