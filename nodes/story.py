"""The STORY value (one subject, one prompt per scene) and the pure rules that assemble it.

Nothing here imports comfy: prompt assembly, input checks and the search for the subject word's tokens work on
plain strings and token ids, so they can be reasoned about (and tested) without a text encoder. The ComfyUI
glue that tokenizes and encodes lives in story_prompts.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

NODE_NAME = "Spectral Story Prompts"
MAX_SCENES = 64
# Rows of different token lengths are batched by repeating each row to the least common multiple of the lengths
# (what ComfyUI does when it concatenates conditionings). 12 chunks covers every mix of 1- to 4-chunk prompts;
# mixes such as 2, 3 and 5 chunks would need 30 chunks per row: far more cross-attention work and memory.
MAX_CONTEXT_CHUNKS = 12
SUBJECT = "{subject}"
SCENE = "{scene}"
_PLACEHOLDER = re.compile(r"\{(subject|scene)\}")
# ComfyUI prompt weights "(word:1.2)": the number is not a word of the subject.
_WEIGHT_SUFFIX = re.compile(r":\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*\)")
_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_EDGE_PUNCTUATION = " \t\r\n.,;:!?\"'()[]{}<>"


def input_error(input_name: str, message: str) -> ValueError:
    """The error ComfyUI shows the user: it names this node and the input to fix."""
    return ValueError(f"{NODE_NAME}, input '{input_name}': {message}")


def parse_scenes(text: str) -> list[str]:
    """One scene per line; surrounding spaces trimmed, blank lines ignored."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_scene_count(scene_count: int) -> None:
    if scene_count == 0:
        raise input_error("scenes", "no scenes. Write one scene per line, e.g. 'reading a book in a cozy library'.")
    if scene_count > MAX_SCENES:
        raise input_error(
            "scenes",
            f"{scene_count} scenes, more than the {MAX_SCENES} one batch may hold. Split them over several "
            f"{NODE_NAME} nodes, each with its own sampler, and give them the same subject, style, negative, size, "
            "seed and same_noise setting. Start every list with the same anchor scenes (as many as the "
            "attention node's anchors): anchors never depend on the other images, so every batch then shares "
            "identical anchors and the subject stays the same across all of them.")


def check_template(style: str) -> None:
    missing = [placeholder for placeholder in (SUBJECT, SCENE) if placeholder not in style]
    if missing:
        raise input_error(
            "style",
            f"the template has no {' and no '.join(missing)} placeholder. Write where the subject and the scene go, "
            "e.g. 'a photo of {subject} {scene}, cinematic'.")


def build_prompt(style: str, subject: str, scene: str) -> str:
    """Fill the template in one pass, so a subject or scene that itself contains '{scene}' stays literal."""
    values = {"subject": subject, "scene": scene}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], style).strip()


def default_subject_word(subject: str) -> str:
    """The subject's last word, ignoring punctuation and prompt-weight numbers: 'a (red fox:1.2)' -> 'fox'."""
    words = [word for word in _WORD.findall(_WEIGHT_SUFFIX.sub(")", subject)) if any(c.isalpha() for c in word)]
    return words[-1] if words else ""


def resolve_subject_word(subject: str, subject_word: str) -> str:
    """The word whose tokens locate the subject: the input if given, else the subject's last word."""
    if not subject.strip():
        raise input_error("subject", "empty. Describe the character or object once, e.g. 'a red fox in a blue scarf'.")
    word = subject_word.strip(_EDGE_PUNCTUATION)
    if not word:
        if subject_word.strip():
            raise input_error("subject_word", f"'{subject_word}' has no letters. Give one word of the subject.")
        word = default_subject_word(subject)
        if not word:
            raise input_error("subject", f"'{subject}' has no word to locate the subject by. Describe it in words.")
        return word
    if not re.search(rf"(?<!\w){re.escape(word)}(?!\w)", subject, flags=re.IGNORECASE):
        raise input_error(
            "subject_word",
            f"'{word}' is not a word of the subject '{subject}'. Give the word that names the subject (e.g. 'fox' "
            "in 'a red fox wearing a blue scarf'), or leave it empty to use the subject's last word.")
    return word


def assemble_prompts(subject: str, scenes: str, style: str) -> list[str]:
    """The final positive prompt of every scene, in batch order, after every input check that needs no encoder."""
    check_template(style)
    scene_lines = parse_scenes(scenes)
    check_scene_count(len(scene_lines))
    return [build_prompt(style, subject, scene) for scene in scene_lines]


def validation_message(subject: str | None, subject_word: str | None, scenes: str | None,
                       style: str | None) -> str | None:
    """The first input problem among the known values (None = linked from another node, not known yet)."""
    try:
        if style is not None:
            check_template(style)
        if scenes is not None:
            check_scene_count(len(parse_scenes(scenes)))
        if subject is not None and subject_word is not None:
            resolve_subject_word(subject, subject_word)
    except ValueError as error:
        return str(error)
    return None


def common_length(lengths: Sequence[int]) -> int:
    """The token count every row is repeated to: the least common multiple, as ComfyUI's CONDCrossAttn.concat."""
    return math.lcm(*lengths)


def check_common_length(chunk_counts: Sequence[int]) -> None:
    common = common_length(chunk_counts)
    if common > MAX_CONTEXT_CHUNKS:
        counts = ", ".join(str(count) for count in sorted(set(chunk_counts)))
        raise input_error(
            "scenes",
            f"the prompts are {counts} chunks of 75 tokens long. Batching them exactly repeats every prompt to "
            f"{common} chunks, above the limit of {MAX_CONTEXT_CHUNKS}. Shorten the longest scenes (or the style) "
            "so that every prompt fits in 1 to 4 chunks, or put scenes of similar length in separate batches.")


def text_tokens(chunks: Sequence[Sequence[int | None]], start_token: int,
                end_token: int) -> list[tuple[int, int | None]]:
    """(position, id) of every text token: what lies between each chunk's start token and its end token.

    `chunks` are the tokenizer's chunks (start token, text, end token, padding), None where an embedding vector
    stands; a position counts from the first chunk's start token on across chunks, as the encoder's output does.
    """
    text: list[tuple[int, int | None]] = []
    offset = 0
    for chunk in chunks:
        first = 1 if chunk and chunk[0] == start_token else 0
        for index in range(first, len(chunk)):
            if chunk[index] == end_token:
                break
            text.append((offset + index, chunk[index]))
        offset += len(chunk)
    return text


def find_word_positions(chunks: Sequence[Sequence[int | None]], word: Sequence[int], start_token: int,
                        end_token: int) -> tuple[int, ...]:
    """Positions of every occurrence of `word`'s token ids among the text tokens of `chunks` (see text_tokens).

    Start, end and padding tokens are skipped, so a long word that ComfyUI splits across two chunks is found too.
    """
    if not word:
        return ()
    text = text_tokens(chunks, start_token, end_token)
    positions: list[int] = []
    index = 0
    while index + len(word) <= len(text):
        if all(text[index + k][1] == word[k] for k in range(len(word))):
            positions.extend(text[index + k][0] for k in range(len(word)))
            index += len(word)
        else:
            index += 1
    return tuple(positions)


@dataclass(frozen=True)
class Story:
    """One subject in several scenes: what SpectralStoryPrompts made, for the nodes that build on it.

    Row b of the positive CONDITIONING and image b of the LATENT belong to prompts[b].

    subject_tokens[b] are the positions of the subject word's tokens in row b's cross-attention context
    (0-based; position 0 is the first chunk's start token; a prompt of several 77-token chunks counts on
    across them). Every row is repeated to the batch's common length (see sequence_lengths); the positions
    are those of the FIRST copy. The same tokens recur at p + k * sequence_lengths[b] in the later copies,
    and attention splits its weight evenly over the copies: subject_positions_for_length lists them all.
    A scene whose prompt lacks the subject word has an empty tuple (see require_subject_in_every_scene).
    """

    prompts: tuple[str, ...]
    subject_tokens: tuple[tuple[int, ...], ...]
    subject_word: str
    width: int
    height: int
    same_noise: bool
    # Added beyond the minimal contract, defaulted so that Story(...) without them stays valid.
    sequence_lengths: tuple[int, ...] = ()  # per scene: its own token count (77 per chunk) before repetition

    def __post_init__(self) -> None:
        if len(self.subject_tokens) != len(self.prompts):
            raise ValueError(f"Story: {len(self.prompts)} prompts but {len(self.subject_tokens)} subject_tokens rows")
        if self.sequence_lengths and len(self.sequence_lengths) != len(self.prompts):
            raise ValueError(f"Story: {len(self.prompts)} prompts but {len(self.sequence_lengths)} sequence_lengths")

    @property
    def scene_count(self) -> int:
        return len(self.prompts)

    @property
    def context_length(self) -> int:
        """The token count of the batched positive conditioning (every row repeated to it)."""
        if not self.sequence_lengths:
            raise ValueError("Story: sequence_lengths unknown; the context length cannot be derived")
        return common_length(self.sequence_lengths)

    def subject_positions_for_length(self, scene: int, context_length: int) -> tuple[int, ...]:
        """Scene `scene`'s subject positions in every copy of its tokens within a context of `context_length`."""
        if not self.sequence_lengths:
            raise ValueError("Story: sequence_lengths unknown; only subject_tokens (the first copy) are known")
        own = self.sequence_lengths[scene]
        if context_length % own:
            raise ValueError(f"Story: a context of {context_length} tokens is not a repetition of scene {scene + 1}'s "
                             f"{own} tokens")
        return tuple(p + copy * own for copy in range(context_length // own) for p in self.subject_tokens[scene])

    def require_subject_in_every_scene(self) -> None:
        """Raise the error users see when subject masks are requested but a scene's prompt lacks the subject word."""
        for index, (prompt, positions) in enumerate(zip(self.prompts, self.subject_tokens, strict=True)):
            if not positions:
                raise input_error(
                    "subject_word",
                    f"subject masks need the subject word '{self.subject_word}' in every prompt, and scene "
                    f"{index + 1} ('{prompt}') does not contain it as a word. Check the style template and that "
                    "scene, or set subject_word to a word every prompt contains.")
