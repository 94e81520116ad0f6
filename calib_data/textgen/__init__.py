"""Template-based text generators for the shipped calibration/evaluation data.

Every sentence here was written for this project; nothing is copied from a corpus, so the
shipped files carry no third-party license. Each generator is a function ``(rng) -> list[str]``
returning paragraphs, so the driver can pack paragraphs into samples of a target token length
and dedupe evaluation paragraphs against calibration paragraphs.
"""

from . import chat, chinese, code, english, mathprob

GENERATORS = {
    "en": english.paragraphs,
    "zh": chinese.paragraphs,
    "code": code.paragraphs,
    "math": mathprob.paragraphs,
}

__all__ = ["GENERATORS", "chat"]
