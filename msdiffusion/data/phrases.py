"""Subject phrases from captions, without a language model.

Two strategies (the detector then looks for each phrase in the image):

- `extract_noun_phrases`: a small rule-based chunker for English captions. Words are split at
  punctuation and at closed-class words (articles, prepositions, conjunctions, pronouns, auxiliary
  verbs, see `STOP_WORDS`); a word ending in "-ing"/"-ed" ends a phrase that already has a word
  ("a dog *sitting* on"), but may start one ("a *sleeping* dog"). Runs that follow a linking verb
  ("the dog is happy") are predicates, not subjects, and are skipped. Of each run the last
  `max_words` words are kept (English puts the head noun last: "small brown dog" -> "brown dog"),
  and runs whose head is a generic word ("photo", "background", see `GENERIC_NOUNS`) are left out.
  It errs on the side of proposing: a wrong phrase usually finds no box and is filtered away.
- `find_vocabulary_phrases`: the words of a fixed vocabulary (one phrase a line in a file, or the
  built-in COCO class names) found in the caption, plurals included.

Either way the returned phrases are substrings of the caption, as the manifest requires.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ARTICLES = {
    "a",
    "an",
    "the",
    "this",
    "that",
    "these",
    "those",
    "some",
    "any",
    "each",
    "every",
    "another",
    "my",
    "your",
    "his",
    "her",
    "its",
    "our",
    "their",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "several",
    "many",
    "few",
    "both",
    "all",
    "no",
}
PREPOSITIONS = {
    "in",
    "on",
    "at",
    "with",
    "without",
    "of",
    "to",
    "from",
    "by",
    "for",
    "into",
    "onto",
    "over",
    "under",
    "above",
    "below",
    "behind",
    "beside",
    "besides",
    "between",
    "near",
    "next",
    "inside",
    "outside",
    "around",
    "through",
    "across",
    "along",
    "against",
    "among",
    "beneath",
    "up",
    "down",
    "off",
    "out",
    "toward",
    "towards",
    "upon",
    "within",
    "atop",
    "like",
    "as",
    "than",
    "front",
    "top",
    "while",
    "during",
    "after",
    "before",
    "about",
    "amid",
}
CONJUNCTIONS = {"and", "or", "but", "nor", "yet", "then", "also", "&"}
PRONOUNS = {
    "i",
    "you",
    "he",
    "she",
    "it",
    "we",
    "they",
    "me",
    "him",
    "them",
    "us",
    "who",
    "whom",
    "whose",
    "which",
    "what",
    "where",
    "when",
    "there",
    "here",
    "itself",
    "themselves",
    "someone",
    "something",
}
LINKING_VERBS = {
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "am",
    "looks",
    "look",
    "seems",
    "seem",
    "appears",
    "appear",
    "becomes",
    "become",
    "stays",
    "remains",
    "feels",
}
# Auxiliaries and adverbs that qualify rather than name ("is *so* blue" stays a predicate).
AUXILIARIES_AND_ADVERBS = {
    "has",
    "have",
    "had",
    "do",
    "does",
    "did",
    "can",
    "could",
    "will",
    "would",
    "shall",
    "should",
    "may",
    "might",
    "must",
    "not",
    "very",
    "really",
    "quite",
    "so",
    "too",
    "just",
    "together",
    "other",
}
STOP_WORDS = ARTICLES | PREPOSITIONS | CONJUNCTIONS | PRONOUNS | LINKING_VERBS | AUXILIARIES_AND_ADVERBS
# Nouns that name the picture or a place in it rather than a thing one could give a reference of.
GENERIC_NOUNS = {
    "photo",
    "photograph",
    "picture",
    "image",
    "view",
    "shot",
    "close-up",
    "closeup",
    "scene",
    "painting",
    "illustration",
    "drawing",
    "render",
    "rendering",
    "background",
    "foreground",
    "side",
    "left",
    "right",
    "middle",
    "center",
    "centre",
    "corner",
    "edge",
    "pair",
    "group",
    "couple",
    "lot",
    "lots",
    "bunch",
    "kind",
    "type",
    "style",
    "day",
    "night",
    "time",
    "way",
    "area",
    "top",
    "bottom",
    "front",
    "back",
    "part",
    "piece",
    "number",
    "set",
    "row",
    "camera",
}

COCO_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
BUILTIN_VOCABULARIES = {"coco": COCO_CLASSES}

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*|[^\sA-Za-z0-9]")


def extract_noun_phrases(caption: str, max_words: int = 2) -> list[str]:
    """Candidate subject phrases of an English caption, in caption order, without repeats."""
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    phrases: list[str] = []
    run: list[re.Match] = []
    predicate = False  # inside the complement of a linking verb ("the dog is *very happy*")

    def close() -> None:
        if run and not predicate:
            words = run[-max_words:]
            head = words[-1].group().lower()
            if head not in GENERIC_NOUNS and not head.isdigit():
                phrase = caption[words[0].start() : words[-1].end()]
                if phrase.lower() not in (p.lower() for p in phrases):
                    phrases.append(phrase)
        run.clear()

    for match in _WORD.finditer(caption):
        word = match.group()
        lower = word.lower()
        if not word[0].isalnum():  # punctuation ends everything, predicates included
            close()
            predicate = False
        elif lower in STOP_WORDS:
            close()
            if lower in LINKING_VERBS:
                predicate = True
            elif lower in ARTICLES or lower in PREPOSITIONS or lower in CONJUNCTIONS:
                predicate = False
        elif run and _looks_like_participle(lower):
            close()
            predicate = False  # "a dog holding a ball": what follows is an object again
        else:
            run.append(match)
    close()
    return phrases


def _looks_like_participle(word: str) -> bool:
    return len(word) > 4 and (word.endswith("ing") or word.endswith("ed"))


def load_vocabulary(spec: str | os.PathLike) -> tuple[str, ...]:
    """A built-in vocabulary by name ("coco") or a text file with one phrase a line (# comments)."""
    if str(spec) in BUILTIN_VOCABULARIES:
        return BUILTIN_VOCABULARIES[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"vocabulary {str(spec)!r} is neither a built-in one ({', '.join(BUILTIN_VOCABULARIES)}) nor a file"
        )
    terms = []
    for line in path.read_text(encoding="utf-8").splitlines():
        term = line.split("#", 1)[0].strip()
        if term:
            terms.append(term)
    if not terms:
        raise ValueError(f"vocabulary file {path} has no phrases (one phrase a line)")
    return tuple(terms)


def find_vocabulary_phrases(caption: str, vocabulary: tuple[str, ...] | list[str]) -> list[str]:
    """Vocabulary terms found in the caption (longest first, no overlaps, plurals too), in caption order."""
    spans: list[tuple[int, int]] = []
    for term in sorted({t.strip().lower() for t in vocabulary if t.strip()}, key=len, reverse=True):
        pattern = r"(?<!\w)" + re.escape(term).replace(r"\ ", r"\s+") + r"(?:s|es)?(?!\w)"
        for match in re.finditer(pattern, caption, flags=re.IGNORECASE):
            if all(match.end() <= start or match.start() >= end for start, end in spans):
                spans.append((match.start(), match.end()))
    phrases: list[str] = []
    for start, end in sorted(spans):
        phrase = caption[start:end]
        if phrase.lower() not in (p.lower() for p in phrases):
            phrases.append(phrase)
    return phrases
