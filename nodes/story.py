"""The STORY value (one subject, one prompt per scene) and the pure rules that assemble it.

Nothing here imports comfy: prompt assembly, input checks and the search for the subject word's tokens work on
plain strings and token ids, so they can be reasoned about (and tested) without a text encoder. The ComfyUI
glue that tokenizes and encodes lives in story_node.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

NODE_NAME = "Spectral Story Prompts"
MAX_SCENES = 64  # in one batch (images_per_batch 0)
MAX_STORY_SCENES = 512  # in a story sampled in several runs
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


def check_scene_count(scene_count: int, split: bool = False) -> None:
    """`split`: the story runs in several sampler runs (images_per_batch > 0), so it may be longer than one batch."""
    if scene_count == 0:
        raise input_error("scenes", "no scenes. Write one scene per line, e.g. 'reading a book in a cozy library'.")
    if split and scene_count > MAX_STORY_SCENES:
        raise input_error("scenes", f"{scene_count} scenes, more than the {MAX_STORY_SCENES} one story may hold. "
                                    f"Split them over several {NODE_NAME} nodes with the same anchor scenes.")
    if not split and scene_count > MAX_SCENES:
        raise input_error(
            "scenes",
            f"{scene_count} scenes, more than the {MAX_SCENES} one batch may hold. Set images_per_batch (e.g. 4): "
            "the story is then sampled in several runs that each repeat the anchors, in the memory of one run.")


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


def default_reference_prompt(style: str, subject: str) -> str:
    """The subject alone in the style template: the scene left empty, with the separators it leaves tidied."""
    prompt = build_prompt(style, subject, "")
    prompt = re.sub(r"\s*,(\s*,)+", ",", prompt)  # "x, , y" -> "x, y"
    prompt = re.sub(r"\s+([,.;:])", r"\1", prompt)  # "fox , cinematic" -> "fox, cinematic"
    return re.sub(r"\s{2,}", " ", prompt).strip(" ,;:")


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


def assemble_prompts(subject: str, scenes: str, style: str, split: bool = False) -> list[str]:
    """The final positive prompt of every scene, in batch order, after every input check that needs no encoder."""
    check_template(style)
    scene_lines = parse_scenes(scenes)
    check_scene_count(len(scene_lines), split)
    return [build_prompt(style, subject, scene) for scene in scene_lines]


def validation_message(subject: str | None, subject_word: str | None, scenes: str | None,
                       style: str | None, anchors: int | None = None,
                       images_per_batch: int | None = None) -> str | None:
    """The first input problem among the known values (None = linked from another node, not known yet)."""
    try:
        if style is not None:
            check_template(style)
        scene_count = len(parse_scenes(scenes)) if scenes is not None else None
        if scene_count is not None:
            # A linked images_per_batch (None) is unknown until run: only the larger limit is certain.
            check_scene_count(scene_count, images_per_batch is None or images_per_batch > 0)
        if anchors is not None and images_per_batch is not None:
            check_run_settings(scene_count or 0, anchors, images_per_batch)
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


MAX_ANCHORS = 64
DEFAULT_ANCHORS = 2


@dataclass(frozen=True)
class StoryRun:
    """One sampler run of a story: what each row of its batch shows.

    Rows are laid out as [reference rows][scene rows]: the first `reference_rows` rows hold reference images
    (SpectralReferenceAnchors; they are then the anchor rows), then one row per entry of `scenes` (scene
    indices, 0-based). The first `anchor_rows` rows are the anchors of this run. The first `replayed_rows` rows
    repeat rows an earlier run already produced: in every run after the first, the anchors, and in a last run
    that would be shorter than the others, the targets just before its own (so that every run has the same size
    and ancestral samplers draw the anchors' per-step noise alike in every run). With deterministic samplers a
    replayed row comes out identical to its first appearance; a sheet shows each scene once, from `new_rows`.
    `noise_indices[r]` is row r's position in the one-batch layout, the latent's batch_index, so that ComfyUI's
    prepare_noise gives every row the initial noise it has in one batch (all zeros with same_noise).
    """

    scenes: tuple[int, ...]
    anchor_rows: int
    noise_indices: tuple[int, ...]
    replayed_rows: int = 0
    reference_rows: int = 0

    def __post_init__(self) -> None:
        if len(self.noise_indices) != self.row_count:
            raise ValueError(f"StoryRun: {self.row_count} rows but {len(self.noise_indices)} noise indices")
        if not 0 <= self.anchor_rows <= self.row_count or not 0 <= self.replayed_rows <= self.row_count:
            raise ValueError(f"StoryRun: {self.anchor_rows} anchor rows and {self.replayed_rows} replayed rows in a "
                             f"run of {self.row_count} rows")

    @property
    def row_count(self) -> int:
        return self.reference_rows + len(self.scenes)

    def scene_of(self, row: int) -> int | None:
        """The scene row `row` shows, or None for a reference row."""
        if not 0 <= row < self.row_count:
            raise IndexError(f"row {row} of a run of {self.row_count} rows")
        return None if row < self.reference_rows else self.scenes[row - self.reference_rows]

    def is_anchor(self, row: int) -> bool:
        return 0 <= row < self.anchor_rows

    def is_replayed(self, row: int) -> bool:
        return 0 <= row < self.replayed_rows

    @property
    def new_rows(self) -> tuple[int, ...]:
        """The scene rows this run is the first to produce (a sheet's cells, in row order)."""
        return tuple(range(max(self.replayed_rows, self.reference_rows), self.row_count))


@dataclass(frozen=True)
class StoryLayout:
    """How a story is split into sampler runs (shared/METHOD.md section 4).

    Every run holds the `anchor_count` anchors first (the first scenes, or later the reference rows), then the
    next scenes in order. `images_per_batch` is the requested run size (0 = the whole story in one run).
    """

    anchor_count: int
    images_per_batch: int
    runs: tuple[StoryRun, ...]

    @property
    def run_count(self) -> int:
        return len(self.runs)

    @property
    def rows_per_run(self) -> tuple[int, ...]:
        return tuple(run.row_count for run in self.runs)

    @property
    def sampled_rows(self) -> int:
        """Rows sampled over all runs, replays included (the compute, in images)."""
        return sum(self.rows_per_run)

    def scene_order(self) -> tuple[tuple[int, int], ...]:
        """(run, row) of every scene's first appearance, in scene order: where a sheet takes each cell from."""
        found: dict[int, tuple[int, int]] = {}
        for run_index, run in enumerate(self.runs):
            for row in run.new_rows:
                found.setdefault(run.scene_of(row), (run_index, row))
        return tuple(found[scene] for scene in sorted(found))


def plan_runs(scene_count: int, anchor_count: int = DEFAULT_ANCHORS, images_per_batch: int = 0,
              same_noise: bool = False, reference_count: int = 0) -> StoryLayout:
    """The runs of a story: one run of every scene, or runs of the anchors followed by the next targets.

    Every run of a split story has images_per_batch rows: a last run that would be shorter starts earlier, so its
    first targets replay the previous run's last ones. With references, every run starts with the
    `reference_count` reference rows, which are the anchors (anchor_count is then ignored); every scene is a target.
    """
    if reference_count:
        return _plan_reference_runs(scene_count, reference_count, images_per_batch, same_noise)
    check_run_settings(scene_count, anchor_count, images_per_batch)

    def noise(scenes: tuple[int, ...]) -> tuple[int, ...]:
        return (0,) * len(scenes) if same_noise else scenes

    if images_per_batch == 0 or scene_count <= images_per_batch:
        scenes = tuple(range(scene_count))
        runs = (StoryRun(scenes=scenes, anchor_rows=min(anchor_count, scene_count), noise_indices=noise(scenes)),)
        return StoryLayout(anchor_count=anchor_count, images_per_batch=images_per_batch, runs=runs)
    anchors = tuple(range(anchor_count))
    targets_per_run = images_per_batch - anchor_count
    runs = []
    for first in range(anchor_count, scene_count, targets_per_run):
        start = min(first, scene_count - targets_per_run)  # the last run starts early rather than run short
        scenes = anchors + tuple(range(start, start + targets_per_run))
        runs.append(StoryRun(scenes=scenes, anchor_rows=anchor_count, noise_indices=noise(scenes),
                             replayed_rows=anchor_count + (first - start) if runs else 0))
    return StoryLayout(anchor_count=anchor_count, images_per_batch=images_per_batch, runs=tuple(runs))


def _plan_reference_runs(scene_count: int, reference_count: int, images_per_batch: int,
                         same_noise: bool) -> StoryLayout:
    """Runs of [the references][the next scenes]; in the one-batch layout row r is reference r, then the scenes."""
    check_run_settings(0, reference_count, images_per_batch)

    def noise(scenes: tuple[int, ...]) -> tuple[int, ...]:
        rows = tuple(range(reference_count)) + tuple(reference_count + scene for scene in scenes)
        return (0,) * len(rows) if same_noise else rows

    def run(scenes: tuple[int, ...], replayed: int = 0) -> StoryRun:
        return StoryRun(scenes=scenes, anchor_rows=reference_count, noise_indices=noise(scenes),
                        replayed_rows=replayed, reference_rows=reference_count)

    targets_per_run = images_per_batch - reference_count
    if images_per_batch == 0 or scene_count <= targets_per_run:
        return StoryLayout(reference_count, images_per_batch, (run(tuple(range(scene_count))),))
    runs = []
    for first in range(0, scene_count, targets_per_run):
        start = min(first, scene_count - targets_per_run)  # the last run starts early rather than run short
        runs.append(run(tuple(range(start, start + targets_per_run)),
                        reference_count + (first - start) if runs else 0))
    return StoryLayout(reference_count, images_per_batch, tuple(runs))


def check_run_settings(scene_count: int, anchor_count: int, images_per_batch: int) -> None:
    """The input errors of anchors / images_per_batch, for the node's execute and for queue-time validation."""
    if not 1 <= anchor_count <= MAX_ANCHORS:
        raise input_error("anchors", f"{anchor_count} is outside 1..{MAX_ANCHORS}. 2 is the research default.")
    if images_per_batch < 0:
        raise input_error("images_per_batch", f"{images_per_batch} is negative. Use 0 for one run of every scene.")
    if images_per_batch == 0:
        return
    if images_per_batch <= anchor_count:
        raise input_error(
            "images_per_batch",
            f"{images_per_batch} images per run leaves no room for new scenes after the {anchor_count} anchors "
            f"every run repeats. Set it above anchors (e.g. {anchor_count + 2}), or to 0 for one run of every scene.")
    if scene_count and anchor_count > scene_count:
        raise input_error(
            "anchors",
            f"{anchor_count} anchors but only {scene_count} scenes. Anchors are the first scenes: write at least "
            f"{anchor_count} scene lines, or lower anchors.")


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
    # The sampler runs (StoryLayout); None means one run of every scene with the default anchors.
    layout: StoryLayout | None = None
    # The scene lines as written (labels of a sheet); empty = unknown, the prompts stand in.
    scenes: tuple[str, ...] = ()
    # Reference rows (layout runs with reference_rows): the prompt they are conditioned on, its subject tokens and
    # its token count, like a scene's.
    reference_prompt: str = ""
    reference_tokens: tuple[int, ...] = ()
    reference_length: int = 0

    def __post_init__(self) -> None:
        if len(self.subject_tokens) != len(self.prompts):
            raise ValueError(f"Story: {len(self.prompts)} prompts but {len(self.subject_tokens)} subject_tokens rows")
        if self.sequence_lengths and len(self.sequence_lengths) != len(self.prompts):
            raise ValueError(f"Story: {len(self.prompts)} prompts but {len(self.sequence_lengths)} sequence_lengths")
        if self.scenes and len(self.scenes) != len(self.prompts):
            raise ValueError(f"Story: {len(self.prompts)} prompts but {len(self.scenes)} scene lines")
        if self.layout is None:
            layout = plan_runs(len(self.prompts), min(DEFAULT_ANCHORS, max(len(self.prompts), 1)), 0,
                               self.same_noise) if self.prompts else StoryLayout(DEFAULT_ANCHORS, 0, ())
            object.__setattr__(self, "layout", layout)
        for run in self.layout.runs:
            if any(not 0 <= scene < len(self.prompts) for scene in run.scenes):
                raise ValueError(f"Story: a run shows scene indices {run.scenes}, outside the {len(self.prompts)} "
                                 "scenes")

    def scene_text(self, scene: int) -> str:
        """Scene `scene`'s line as the user wrote it (its prompt when unknown)."""
        return self.scenes[scene] if self.scenes else self.prompts[scene]

    @property
    def anchor_count(self) -> int:
        return self.layout.anchor_count

    @property
    def reference_count(self) -> int:
        """How many reference rows start every run (0: the anchors are generated scenes)."""
        return self.layout.runs[0].reference_rows if self.layout.runs else 0

    @property
    def run_count(self) -> int:
        return self.layout.run_count

    @property
    def is_split(self) -> bool:
        """Whether the story is sampled in more than one run (the anchors are then replayed in every run)."""
        return self.layout.run_count > 1

    def for_run(self, run_index: int) -> Story:
        """The rows of one run as a one-run story: prompt, subject tokens and token count of each row, in row order.

        Reference rows carry the reference prompt, its subject tokens and token count.
        """
        run = self.layout.runs[run_index]
        scenes = [run.scene_of(row) for row in range(run.row_count)]
        lengths = tuple(self.sequence_lengths[s] if s is not None else self.reference_length for s in scenes) \
            if self.sequence_lengths else ()
        # Row r of the run is prompt r of the one-run story (reference rows keep their place, with no prompt).
        rows = StoryLayout(anchor_count=self.anchor_count, images_per_batch=0,
                           runs=(StoryRun(scenes=tuple(range(run.reference_rows, run.row_count)),
                                          anchor_rows=run.anchor_rows, reference_rows=run.reference_rows,
                                          noise_indices=tuple(range(run.row_count))),))
        return Story(prompts=tuple(self.prompts[s] if s is not None else self.reference_prompt for s in scenes),
                     scenes=tuple(self.scene_text(s) if s is not None else "reference" for s in scenes),
                     subject_tokens=tuple(self.subject_tokens[s] if s is not None else self.reference_tokens
                                          for s in scenes),
                     subject_word=self.subject_word, width=self.width, height=self.height, same_noise=self.same_noise,
                     sequence_lengths=lengths, layout=rows)

    @property
    def scene_count(self) -> int:
        return len(self.prompts)

    @property
    def context_length(self) -> int:
        """The token count of the batched positive conditioning (every row repeated to it)."""
        if not self.sequence_lengths:
            raise ValueError("Story: sequence_lengths unknown; the context length cannot be derived")
        references = (self.reference_length,) if self.reference_count and self.reference_length else ()
        return common_length(self.sequence_lengths + references)

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
        if self.reference_count and not self.reference_tokens:
            raise input_error(
                "reference_prompt",
                f"subject masks need the subject word '{self.subject_word}' in the reference prompt "
                f"('{self.reference_prompt}'): the references' masks come from it. Add the word, or set subject_word "
                "to a word every prompt contains.")
        for index, (prompt, positions) in enumerate(zip(self.prompts, self.subject_tokens, strict=True)):
            if not positions:
                raise input_error(
                    "subject_word",
                    f"subject masks need the subject word '{self.subject_word}' in every prompt, and scene "
                    f"{index + 1} ('{prompt}') does not contain it as a word. Check the style template and that "
                    "scene, or set subject_word to a word every prompt contains.")
