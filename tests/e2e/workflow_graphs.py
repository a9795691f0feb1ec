"""The example workflows of workflows/, as graphs that export_workflow.py builds in the real frontend and saves.

Each graph lists its nodes as (key, type, position, size or None, {widget: value}[, title]) and its links as
(from key, output type or name, to key, input name or widget name), the shapes e2e_support.BUILD_GRAPH_JS takes
(export_workflow.py sets the optional titles).
Groups are (title, [x, y, width, height], colour). Note texts are written as prose: `_prose` joins the lines of a
paragraph, so the frontend's text box wraps them at any width.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


@dataclass(frozen=True)
class WorkflowGraph:
    name: str
    nodes: list
    links: list
    groups: list = field(default_factory=list)
    # (scale, offset) of the saved view; None fits the whole graph into the browser window.
    view: tuple[float, list[int]] | None = None
    # The file name in workflows/ (without .json): the template browser shows it as the title (frontend 1.32.9
    # reads no other metadata for a pack's templates) and its alphabetical sort follows the leading number.
    title: str = ""

    def __post_init__(self) -> None:
        if not self.title:
            object.__setattr__(self, "title", self.name)


# Where to start first: the template browser's titles, in the order a new user should open them.
TITLES = {
    "spectral_character_sheet_sdxl": "1 Character sheet, SDXL (start here)",
    "spectral_character_sheet_sd15": "2 Character sheet, SD 1.5",
    "side_by_side_comparison_sdxl": "3 Side by side, three methods (SDXL)",
    "consistory_baseline_sdxl": "4 ConsiStory baseline (SDXL)",
    "spectrum_plot_sdxl": "5 Spectrum plot of the filters (SDXL)",
    "anchor_attention_basic": "6 Smallest setup, one node (SDXL)",
}


def _prose(text: str) -> str:
    """Unwrap hard-wrapped paragraphs: lines join with a space, except before a blank line, after one, or before a
    list item ("- ..."), so each paragraph and each list item is one line the text box wraps itself."""
    out: list[str] = []
    for line in text.strip("\n").splitlines():
        line = line.strip()
        if out and line and out[-1] and not line.startswith("- "):
            out[-1] += " " + line
        else:
            out.append(line)
    return "\n".join(out)


# How the frontend's Note text box lays out text (monospace), in canvas units: to size each note to its text.
_NOTE_CHAR_WIDTH, _NOTE_LINE_HEIGHT, _NOTE_PADDING = 5.6, 12.5, 45


def _note(key: str, pos: list[int], width: int, text: str, title: str) -> tuple:
    """A Note node as tall as its text needs at this width."""
    columns = int((width - 30) / _NOTE_CHAR_WIDTH)
    lines = sum(max(1, len(textwrap.wrap(line, columns))) for line in text.splitlines())
    return (key, "Note", pos, [width, int(_NOTE_PADDING + lines * _NOTE_LINE_HEIGHT)], {"text": text}, title)


def _below(node: tuple, gap: int = 70) -> int:
    """The y of a node placed under this one (a node's title bar sits above its position)."""
    return node[2][1] + node[3][1] + gap


# ---------------------------------------------------------------- anchor_attention_basic (unchanged)

_BASIC_NOTE = """Spectral Anchor Attention: the basics

One prompt, a batch of 4: the first 2 images are anchors, and every image also attends to the anchors' keys
and values in the UNet's self-attention, so the fox keeps the same look across the batch.

- anchors: how many of the first images are anchors (2, the research default). Keep it below the batch size.
- layers: decoder = the UNet's output blocks (ConsiStory's choice). More layers: more identity, more background
  leaking between images.
- start_percent 0.01: the first step stays plain so every image lays itself out freely.
- end_percent 1.0: share until the end. At or below start_percent sharing is off.
- key_spectrum / value_spectrum (unconnected here): spectral filters for the anchors' keys and values.

The badge above the attention node shows anchors N of the batch and warns about settings that do nothing.
Put your SDXL checkpoint in the loader. Swap the prompt for Spectral Story Prompts to give every image its own
scene."""

ANCHOR_ATTENTION_BASIC = WorkflowGraph(
    name="anchor_attention_basic",
    title=TITLES["anchor_attention_basic"],
    nodes=[
        ("note", "Note", [40, 40], [420, 420], {"text": _BASIC_NOTE}),
        ("loader", "CheckpointLoaderSimple", [40, 500], None, {"ckpt_name": SDXL_CHECKPOINT}),
        ("attention", "SpectralAnchorAttention", [500, 40], None,
         {"anchors": 2, "layers": "decoder", "start_percent": 0.01, "end_percent": 1.0}),
        ("positive", "CLIPTextEncode", [500, 420], [400, 160],
         {"text": "a photo of a red fox wearing a blue scarf, sitting in a cozy library, cinematic, highly detailed"}),
        ("negative", "CLIPTextEncode", [500, 620], [400, 140], {"text": "blurry, lowres, deformed, watermark, text"}),
        ("latent", "EmptyLatentImage", [500, 800], None, {"width": 1024, "height": 1024, "batch_size": 4}),
        ("sampler", "KSampler", [960, 260], None,
         {"seed": 42, "control_after_generate": "fixed", "steps": 30, "cfg": 5.0, "sampler_name": "dpmpp_2m",
          "scheduler": "karras", "denoise": 1.0}),
        ("decode", "VAEDecode", [1320, 260], None, {}),
        ("save", "SaveImage", [1540, 260], [360, 420], {"filename_prefix": "spectral_anchors/anchor_attention_basic"}),
    ],
    links=[
        ("loader", "MODEL", "attention", "model"),
        ("attention", "MODEL", "sampler", "model"),
        ("loader", "CLIP", "positive", "clip"),
        ("loader", "CLIP", "negative", "clip"),
        ("positive", "CONDITIONING", "sampler", "positive"),
        ("negative", "CONDITIONING", "sampler", "negative"),
        ("latent", "LATENT", "sampler", "latent_image"),
        ("sampler", "LATENT", "decode", "samples"),
        ("loader", "VAE", "decode", "vae"),
        ("decode", "IMAGE", "save", "images"),
    ],
    view=(0.8, [90, 100]),
)

# ---------------------------------------------------------------- shared pieces of the character-sheet family

SUBJECT = "a young explorer with curly red hair, round glasses and a green canvas backpack"
SUBJECT_WORD = "explorer"
SCENES = [
    "reading a paper map in a dense jungle",
    "standing on a snowy mountain ridge at sunrise",
    "sitting in a busy train station cafe",
    "rowing a small wooden boat across a misty lake",
    "sketching ancient ruins under a starry sky",
    "walking down a rainy city street at night",
]
STYLE = "a photo of {subject}, {scene}, cinematic lighting, highly detailed"
NEGATIVE = "blurry, lowres, deformed, disfigured, extra limbs, watermark, text"
SEED = 42


def _story(scenes: list[str], size: int, same_noise: bool = False) -> dict:
    return {"subject": SUBJECT, "subject_word": SUBJECT_WORD, "scenes": "\n".join(scenes), "style": STYLE,
            "negative": NEGATIVE, "width": size, "height": size, "same_noise": same_noise}


def _sampler(cfg: float, seed: int = SEED) -> dict:
    return {"seed": seed, "control_after_generate": "fixed", "steps": 30, "cfg": cfg, "sampler_name": "dpmpp_2m",
            "scheduler": "karras", "denoise": 1.0}


# The research's recommended spectra: K truncated to its top 5 %, V log_squared-reweighted then energy 0.95.
_K_TRUNCATE = {"mode": "quantile", "value": 0.05, "solver": "exact"}
_V_REWEIGHT = {"mode": "log_squared", "alpha": 1.0}
_V_TRUNCATE = {"mode": "energy", "value": 0.95, "solver": "exact"}
_SPECTRAL_ATTENTION = {"anchors": 2, "layers": "decoder", "start_percent": 0.01, "end_percent": 1.0,
                       "subject_masks": False, "mask_dropout": 0.5, "mask_seed": 0, "query_blending": False}
_CONSISTORY_ATTENTION = {"anchors": 2, "layers": "decoder", "start_percent": 0.01, "end_percent": 1.0,
                         "subject_masks": True, "mask_dropout": 0.5, "mask_seed": 0, "query_blending": True}
# ConsiStory's steps n/10 .. n/3 (3-9 of 30): on the karras schedule those sit at percents 0.076-0.283.
_INJECTION = {"strength": 0.8, "start_percent": 0.07, "end_percent": 0.3, "layers": "finest", "anchors": 2,
              "correspondence": "two-pass", "feature_timestep": 261.0}

def _spectra_nodes(x: int, top: int, width: int) -> list:
    """The recommended spectra, stacked: K Truncate, then V Reweight feeding V Truncate."""
    return [
        ("k_truncate", "SpectralTruncate", [x, top], [width, 130], _K_TRUNCATE, "Keys (K): Spectral Truncate"),
        ("v_reweight", "SpectralReweight", [x, top + 200], [width, 110], _V_REWEIGHT,
         "Values (V): Spectral Reweight"),
        ("v_truncate", "SpectralTruncate", [x, top + 380], [width, 130], _V_TRUNCATE,
         "Values (V): Spectral Truncate"),
    ]


def _spectra_links(attention: str) -> list:
    return [
        ("k_truncate", "SPECTRUM", attention, "key_spectrum"),
        ("v_reweight", "SPECTRUM", "v_truncate", "spectrum"),
        ("v_truncate", "SPECTRUM", attention, "value_spectrum"),
    ]


# Checkpoint -> story -> spectral attention -> KSampler -> VAE Decode, as the single-lane workflows wire it.
_SPECTRAL_PIPELINE_LINKS = [
    ("loader", "CLIP", "story", "clip"),
    ("loader", "MODEL", "attention", "model"),
    *_spectra_links("attention"),
    ("story", "SPECTRAL_STORY", "attention", "story"),
    ("attention", "MODEL", "sampler", "model"),
    ("story", "positive", "sampler", "positive"),
    ("story", "negative", "sampler", "negative"),
    ("story", "latent", "sampler", "latent_image"),
    ("sampler", "LATENT", "decode", "samples"),
    ("loader", "VAE", "decode", "vae"),
]


_SPECTRA_NOTE = _prose("""
Spectral filters: what the other images see of the anchors

In every shared layer, each anchor's keys (K) and values (V) are a matrix (tokens x channels). Before the other
images attend to them, their singular values are filtered here. An image's own K and V are never changed.

- K (key_spectrum): Spectral Truncate, quantile 0.05 = keep the largest 5 % of K's singular values. The research
found that K mostly decides background leakage between images, so keep 1-5 %: with 10 % or more, the anchors'
backgrounds start to show up in the other scenes. 0.05 was best for most prompts; try 0.01-0.03 if backgrounds
still leak, or raise it a little if the character drifts.
- V (value_spectrum): Spectral Reweight log_squared, then Spectral Truncate energy 0.95. V mostly decides how
similar the subject looks. log_squared (s -> (ln s)^2, rescaled to the same overall size) flattens the spectrum so
the weaker directions that carry the subject's details count more: the best single result in the study. Energy
0.95 then keeps the fewest values that hold 95 % of the reweighted energy: the bulk of the subject without the
long tail. Energy needs at least 0.9 to help and is very sensitive above that: move it in small steps (0.93-0.97).
- Chains run top to bottom: Reweight feeds Truncate, and each step sees the previous step's output. The badges show
each chain as the spectrum plot titles it.
- solver exact (recommended); lowrank is an explicit, approximate shortcut.
- Unplug key_spectrum / value_spectrum to share K / V unfiltered: more identity, more background leakage.
""")

_SAMPLER_NOTE = _prose("""
Sampler settings

- dpmpp_2m with the karras schedule, 30 steps: a deterministic sampler (it adds no fresh noise during sampling), so
the same seed gives the same images and a change you make is the only thing that changes them; it converges well
for SDXL in 25-30 steps. euler (normal) works as well, is also deterministic, but needs a few more steps for the same
detail. Ancestral and SDE samplers work too, but add noise at every step.
- cfg 5: ConsiStory's reference value for SDXL.
- seed: fixed, so re-queueing after changing a knob compares like with like. The six images get six different noises
from the one seed (unless same_noise is on).
- Any sampler node works: the patch lives on the MODEL, not in the sampler.
""")


def _story_note(scene_count: int, size: int, model_family: str) -> str:
    return _prose(f"""
Spectral Story Prompts: one subject, one scene per line

- subject: the character, described once; it replaces {{subject}} in style for every image.
- subject_word: the noun that names it ("explorer"). Only subject masks (ConsiStory mode) use it; the spectral
variant does not, but setting it keeps a later switch to masks working.
- scenes: {scene_count} lines = {scene_count} images, in order. The first 2 lines are the anchors: give them clear,
simple views of the character. Blank lines are ignored.
- style: the prompt template of every image; it must keep {{subject}} and {{scene}}.
- negative: shared by every image.
- width / height: {size} x {size}, {model_family}'s native size.
- same_noise off: every image starts from its own noise (more pose and layout variety). On: all start from the same
noise (ConsiStory's "same latent" option): more identity, less variety.

The badge above this node counts the scenes and warns when anchors >= scenes.
""")


_ATTENTION_NOTE = _prose("""
Spectral Anchor Attention (mask-free spectral mode)

- anchors 2: the first 2 scenes are anchors (the research default). Every image also attends to the anchors' keys
and values; anchors see each other but never the other scenes, so editing a later scene never changes the anchors.
Keep anchors below the scene count (the badge reads "anchors 2 of N").
- layers decoder: the UNet's output blocks, ConsiStory's choice. decoder+middle or all: more identity, more
background leakage.
- start_percent 0.01: the first step stays plain so each image lays itself out freely. end_percent 1.0: share to
the end.
- story: connected so the badge can count the scenes; the spectral mode needs nothing else from it.
- subject_masks and query_blending off: those are ConsiStory's parts (see template 4, ConsiStory baseline); mask_dropout
and mask_seed only matter with subject_masks on.
""")


_PRESET_NOTE = _prose("""
Consistent Character: start from the recommended preset

- preset recommended: the research's best balance between one consistent character and clean backgrounds. Try the
others when you need to:
- stronger identity: every image also starts from the same noise. More alike, in more similar poses.
- more variety: the first tenth of the steps stays unshared and the early layouts are blended back in. More
different poses and layouts, a little less alike.
- less background leakage: a gentler filter on what the scenes take from the anchors, so the anchors' backgrounds
show up less in the other scenes.
- custom: your own Spectral Truncate / Spectral Reweight chains on key_spectrum and value_spectrum (the research
knobs; see template 5, Spectrum plot, for the recommended chains as nodes).
- anchors 2: the first 2 scenes are the anchors the others take the character from.

The node's help page (the ? on the node) lists the exact settings of every preset. For ConsiStory's subject masks
and feature injection, use Spectral Anchor Attention and Spectral Feature Injection (template 4).
""")


def _character_sheet(name: str, checkpoint: str, size: int, cfg: float, overview: str, sampler_note: str,
                     family: str) -> WorkflowGraph:
    scenes = SCENES
    output_note = _prose(f"""
Output: {len(scenes)} frames and one character sheet

- Save Image (frames) writes the {len(scenes)} images at full size, one file per scene, in scene order.
- The sheet: ComfyUI's core has an Image Grid node (category dataset/image, marked experimental in ComfyUI 0.3.75)
that tiles a LIST of images, not a batch, so Rebatch Images (batch_size 1) first splits the batch into a list.
Get Image Size reads the frames' width and height into Image Grid's cell_width and cell_height, so every cell is a
frame at full size, whatever width and height the story uses. Image Grid: 3 columns x 2 rows, 8 px black padding;
Save Image (sheet) writes it as one image.
- No core node writes text onto images, so the sheet carries no labels: cells run left to right, top to bottom,
in scene order (the 2 anchors first).
""")
    overview_note = _note("overview", [40, 40], 440, overview, "Read me: spectral character sheet")
    return WorkflowGraph(
        name=name,
        title=TITLES[name],
        nodes=[
            overview_note,
            ("loader", "CheckpointLoaderSimple", [40, _below(overview_note)], [440, 100], {"ckpt_name": checkpoint}),
            ("story", "SpectralStoryPrompts", [520, 40], [440, 620], _story(scenes, size)),
            _note("story_note", [520, 730], 440, _story_note(len(scenes), size, family), "Story prompts: the knobs"),
            ("preset", "SpectralConsistencyPreset", [1000, 40], [400, 130], {"preset": "recommended", "anchors": 2}),
            _note("preset_note", [1000, 260], 440, _PRESET_NOTE, "Consistent Character: the presets"),
            ("sampler", "KSampler", [1500, 40], [320, 270], _sampler(cfg)),
            _note("sampler_note", [1500, 440], 360, sampler_note, "Sampler: why these settings"),
            ("decode", "VAEDecode", [1900, 40], [200, 50], {}),
            ("save_frames", "SaveImage", [2140, 40], [320, 300],
             {"filename_prefix": f"spectral_anchors/{name}/frame"}, "Save Image (frames)"),
            ("rebatch", "RebatchImages", [1900, 440], [200, 60], {"batch_size": 1}),
            ("size", "GetImageSize", [1900, 580], [200, 80], {}),
            ("grid", "ImageGrid", [2140, 440], [320, 160],
             {"columns": 3, "cell_width": size, "cell_height": size, "padding": 8}),
            ("save_sheet", "SaveImage", [2500, 40], [420, 320],
             {"filename_prefix": f"spectral_anchors/{name}/sheet"}, "Save Image (sheet)"),
            _note("output_note", [2500, 440], 420, output_note, "Output: frames and sheet"),
        ],
        links=[
            ("loader", "CLIP", "story", "clip"),
            ("loader", "MODEL", "preset", "model"),
            ("preset", "MODEL", "sampler", "model"),
            ("story", "positive", "sampler", "positive"),
            ("story", "negative", "sampler", "negative"),
            ("story", "latent", "sampler", "latent_image"),
            ("sampler", "LATENT", "decode", "samples"),
            ("loader", "VAE", "decode", "vae"),
            ("decode", "IMAGE", "save_frames", "images"),
            ("decode", "IMAGE", "rebatch", "images"),
            ("decode", "IMAGE", "size", "image"),
            ("rebatch", "IMAGE", "grid", "images"),
            ("size", "width", "grid", "cell_width"),
            ("size", "height", "grid", "cell_height"),
            ("grid", "IMAGE", "save_sheet", "images"),
        ],
    )


# ---------------------------------------------------------------- spectral_character_sheet_sdxl

_SHEET_SDXL_OVERVIEW = _prose("""
Spectral character sheet (SDXL)

One character, six scenes, one batch. Spectral Story Prompts writes one prompt per scene (the style template filled
with the subject and the scene) and an empty latent with one image per scene. Consistent Character makes the first
2 images anchors: every image also attends to the anchors' keys and values in the UNet's decoder self-attention, so
the character keeps one look in all six scenes. Its preset, recommended, filters what the scenes take from the
anchors by their singular values (the spectral variant of ConsiStory, with the research's recommended settings).

How to use: choose your SDXL checkpoint in Load Checkpoint (sd_xl_base_1.0 here; the file goes in ComfyUI's
models/checkpoints folder), describe the character once in subject and write one scene per line. Queue. If the
character drifts, try the preset stronger identity; if every scene looks alike, more variety; if the anchors'
backgrounds show up in the other scenes, less background leakage.

Cost: the six 1024 x 1024 images are sampled as one batch, so they need the memory of a batch of six plus the
anchors' extra keys and values (the extended attention). If you run out of memory, use fewer scenes or a smaller
size.

Every knob is explained in the notes next to its node. For the ConsiStory-style setup see
template 4 (ConsiStory baseline), for a comparison on identical seeds template 3 (Side by side), and to see what the
filters do template 5 (Spectrum plot).
""")

SPECTRAL_CHARACTER_SHEET_SDXL = _character_sheet(
    "spectral_character_sheet_sdxl", SDXL_CHECKPOINT, 1024, 5.0, _SHEET_SDXL_OVERVIEW, _SAMPLER_NOTE, "SDXL")

# ---------------------------------------------------------------- spectral_character_sheet_sd15

_SHEET_SD15_OVERVIEW = _prose("""
Spectral character sheet (SD 1.5)

The SD 1.5 version of template 1 (Character sheet, SDXL): one character, six scenes, one batch, the first 2 images as
anchors, and the same recommended preset of Consistent Character. The pack works on
SD 1.x / 2.x UNets as on SDXL; the research's numbers were measured on SDXL, so treat them as a starting point here.

What differs from SDXL: the checkpoint (v1-5-pruned-emaonly here; any SD 1.5 fine-tune works), 512 x 512 images
(SD 1.5's native size), and cfg 7 (SD 1.5 usually wants a higher cfg than SDXL). Spectral Story Prompts encodes
with SD 1.5's single CLIP; the SDXL size conditioning it also adds is ignored by SD 1.5.

How to use: choose your SD 1.5 checkpoint, describe the character once in subject, write one scene per line,
queue. Every knob is explained in the notes next to its node.
""")

_SAMPLER_NOTE_SD15 = _SAMPLER_NOTE.replace(
    "cfg 5: ConsiStory's reference value for SDXL.",
    "cfg 7: SD 1.5's usual guidance (ConsiStory's reference used 5 with SDXL); 6-8 all work.").replace(
    "for SDXL in 25-30 steps", "in 25-30 steps")

SPECTRAL_CHARACTER_SHEET_SD15 = _character_sheet(
    "spectral_character_sheet_sd15", SD15_CHECKPOINT, 512, 7.0, _SHEET_SD15_OVERVIEW, _SAMPLER_NOTE_SD15, "SD 1.5")

# ---------------------------------------------------------------- consistory_baseline_sdxl

_CONSISTORY_OVERVIEW = _prose("""
ConsiStory baseline (SDXL)

The published ConsiStory method (Tewel et al., 2024), built from this pack's nodes, as the baseline the spectral
variant is measured against. Same character and six scenes as template 1 (Character sheet, SDXL); the first 2 images are
anchors.

- Subject masks: anchors share only the tokens where the subject is, found from the cross-attention of the subject
word ("explorer"), so less background leaks between images.
- Mask dropout 0.5: half of each anchor's subject tokens are left out, redrawn every step, for pose variety.
- Query blending: during the first tenth of the steps the shared layers also use the queries of a plain forward,
to give back layout variety.
- Feature injection, two-pass: a first pass finds, for each token of the subject, the matching token of an anchor;
the real pass then blends the anchor's attention output into it, to align small details.
- FreeU (b1 1.1, b2 1.2, s1 0.6, s2 0.4): part of ConsiStory's reference setup. Bypass it (select it, Ctrl+B) to
compare with the plain model.

Cost: the two-pass injection samples about 1.6x as long as one sampling (its first pass stops at the step nearest
timestep 261: about 60 % of the steps with this karras schedule, about 74 % with the normal one), and query
blending adds one extra model forward on its few steps. ConsiStory works best on people and animals; on
unusual objects (a bus, a gift box) the masks can miss, which is what the spectral variant avoids.

Choose your SDXL checkpoint in Load Checkpoint and queue. Every knob is explained in the note next to its node.
""")

_CONSISTORY_STORY_NOTE = _prose("""
Spectral Story Prompts (ConsiStory mode)

- subject_word matters here: it is the word whose cross-attention gives the subject masks ("explorer"). It must be
a word of the subject; empty takes the subject's last word, which is often not the noun (here "backpack").
- subject / scenes / style / negative: as in the character sheet; one scene per line, the first 2 are anchors.
- width / height 1024: SDXL's native size (ConsiStory's too).
- same_noise: ConsiStory's "same latent" option. Off here: every image starts from its own noise, for more pose
and layout variety. On: all images start from the same initial noise: more identity, less variety (the subjects
tend to take the same pose and place). Try it when identity is weak.
- story output: connected to the attention node, which needs it for subject_masks.
""")

_CONSISTORY_ATTENTION_NOTE = _prose("""
Spectral Anchor Attention (ConsiStory mode)

- subject_masks on: masked sharing; anchors contribute only their subject tokens (needs the story input). The
masks are the subject word's cross-attention, averaged and thresholded (Otsu) per image.
- mask_dropout 0.5 (ConsiStory's default): lower = more identity, less pose variety; higher = the reverse.
- mask_seed: the seed of the dropout; same seed, same images.
- query_blending on: mixes in a plain forward's queries during the first n/10 steps (weight 0.9 falling to 0.82);
with 30 steps that is steps 1-2, with fewer than 20 steps nothing.
- anchors 2, layers decoder, start 0.01, end 1.0: ConsiStory's defaults (see the character sheet's notes).
- key_spectrum / value_spectrum empty: the pure baseline. Plugging spectra in as well is allowed (a hybrid).
""")

_INJECTION_NOTE = _prose("""
Spectral Feature Injection (ConsiStory's second part)

- correspondence two-pass (faithful): a first sampling runs to the step nearest timestep 261 (about 60 % of the
steps with the karras schedule used here, about 74 % with normal), reads the UNet's features there and matches
every subject token to an anchor's; then the real sampling runs.
The progress bar runs twice. single-pass: no first pass, coarser matches, about the cost of one sampling.
- strength 0.8: an injected token takes 0.8 x the anchor's attention output + 0.2 x its own. 0 turns injection off.
- start_percent 0.07, end_percent 0.3: ComfyUI's percents of the noise schedule, as ControlNet's: with 30 karras
steps, steps 3-9 inject (ConsiStory's n/10 .. n/3; on the normal schedule that is 0.1 to 0.333).
- layers finest: the self-attention layers on the finest grid (64 x 64 at 1024 px), encoder and decoder.
- anchors: used only without the attention node; here the attention node's 2 wins.
- feature_timestep 261: ConsiStory's choice; lower = a longer first pass, sharper but more image-specific features.

It sits after the attention node; the other order works as well.
""")

_CONSISTORY_SAMPLER_NOTE = _prose("""
Sampler settings

- dpmpp_2m karras, 30 steps: a deterministic sampler, so the same seed gives the same images, and the two-pass
injection's first pass follows exactly the path of the real one. ConsiStory's paper used 50 DDIM steps; 30
dpmpp_2m steps reach similar quality faster. euler (normal) works as well, with a few more steps.
- cfg 5: ConsiStory's value for SDXL.
- seed fixed: re-queueing after changing a knob compares like with like.

Output: Save Image writes the six images, one file per scene, in scene order.
""")

_FREEU_NOTE = _prose("""
FreeU (core node): b1 1.1, b2 1.2, s1 0.6, s2 0.4, the values of ConsiStory's reference setup. It reweights the
UNet decoder's backbone features (b) and skip connections (s): a quality tweak, not part of the consistency
method. Bypass it (select, Ctrl+B) to compare with the plain model.
""")
_consistory_overview = _note("overview", [40, 40], 440, _CONSISTORY_OVERVIEW, "Read me: ConsiStory baseline")
_consistory_loader = ("loader", "CheckpointLoaderSimple", [40, _below(_consistory_overview)], [440, 100],
                      {"ckpt_name": SDXL_CHECKPOINT})
_consistory_freeu = ("freeu", "FreeU", [40, _below(_consistory_loader)], [440, 130],
                     {"b1": 1.1, "b2": 1.2, "s1": 0.6, "s2": 0.4})

CONSISTORY_BASELINE_SDXL = WorkflowGraph(
    name="consistory_baseline_sdxl",
    title=TITLES["consistory_baseline_sdxl"],
    nodes=[
        _consistory_overview,
        _consistory_loader,
        _consistory_freeu,
        _note("freeu_note", [40, _below(_consistory_freeu)], 440, _FREEU_NOTE, "FreeU: ConsiStory's reference setup"),
        ("story", "SpectralStoryPrompts", [520, 40], [440, 620], _story(SCENES, 1024)),
        _note("story_note", [520, 730], 440, _CONSISTORY_STORY_NOTE, "Story prompts: subject word and same_noise"),
        ("attention", "SpectralAnchorAttention", [1000, 40], [340, 330], _CONSISTORY_ATTENTION),
        _note("attention_note", [1000, 440], 420, _CONSISTORY_ATTENTION_NOTE,
              "Anchor attention: masks, dropout, query blending"),
        ("injection", "SpectralFeatureInjection", [1460, 40], [340, 260], _INJECTION),
        _note("injection_note", [1460, 440], 440, _INJECTION_NOTE, "Feature injection: the knobs"),
        ("sampler", "KSampler", [1940, 40], [320, 270], _sampler(5.0)),
        _note("sampler_note", [1940, 440], 380, _CONSISTORY_SAMPLER_NOTE, "Sampler and output"),
        ("decode", "VAEDecode", [2360, 40], [200, 50], {}),
        ("save", "SaveImage", [2600, 40], [420, 420],
         {"filename_prefix": "spectral_anchors/consistory_baseline_sdxl"}),
    ],
    links=[
        ("loader", "CLIP", "story", "clip"),
        ("loader", "MODEL", "freeu", "model"),
        ("freeu", "MODEL", "attention", "model"),
        ("story", "SPECTRAL_STORY", "attention", "story"),
        ("attention", "MODEL", "injection", "model"),
        ("injection", "MODEL", "sampler", "model"),
        ("story", "positive", "sampler", "positive"),
        ("story", "negative", "sampler", "negative"),
        ("story", "latent", "sampler", "latent_image"),
        ("sampler", "LATENT", "decode", "samples"),
        ("loader", "VAE", "decode", "vae"),
        ("decode", "IMAGE", "save", "images"),
    ],
)

# ---------------------------------------------------------------- side_by_side_comparison_sdxl

_COMPARISON_SCENES = SCENES[:4]
_COMPARISON_OVERVIEW = _prose("""
Side by side: vanilla, ConsiStory-style, spectral (SDXL)

The same four prompts (one Spectral Story Prompts node) and the same seed (one seed node wired into all three
samplers) go through three models:
- vanilla: the checkpoint as it is, no sharing; each image on its own.
- ConsiStory-style: subject masks, mask dropout 0.5, query blending and two-pass feature injection (as in
template 4, without FreeU so that only the sharing differs).
- spectral: mask-free sharing with the recommended spectra (the recommended preset of template 1, as explicit nodes).
Only the model differs, so any difference between
the three comes from the method.

Saved files: spectral_anchors/comparison/vanilla_*, consistory_* and spectral_* (one file per scene each), and
comparison_* (one image with everything).

What core nodes can and cannot do: ComfyUI 0.3.75's core has no node that writes text onto an image, so the
comparison image carries no labels. Its layout is fixed instead: one row per scene (in scene order), and in each
row, left to right: vanilla | ConsiStory-style | spectral, separated by white bars. Image Stitch joins the three
per scene, Rebatch Images splits the batch into a list, and Image Grid (core, marked experimental) stacks the rows.

Cost: three samplings of four images, one of them two-pass (about 1.6x with this karras schedule): about 3.6x
the time of one batch.
""")

_COMPARISON_SEED_NOTE = _prose("""
One seed for all three

The Int node feeds the seed input of all three KSamplers, so they start from identical noise; control fixed keeps
it between runs. Set it to randomize to explore: all three still share each new seed.
""")

_COMPARISON_STORY_NOTE = _prose("""
Spectral Story Prompts: four scenes (the first two are the anchors of both sharing methods), 1024 x 1024,
same_noise off. subject_word "explorer" gives the ConsiStory lane its subject masks; the spectral lane ignores it.
Every lane gets this node's positive, negative and latent, so the prompts are identical.
""")

_CONSISTORY_LANE_NOTE = _prose("""
ConsiStory-style lane: Spectral Anchor Attention with subject_masks on (story connected), mask_dropout 0.5,
query_blending on, no spectra; then Spectral Feature Injection, two-pass, strength 0.8, percents 0.07-0.3 (steps 3-9),
finest layers. The knobs are explained in template 4 (ConsiStory baseline).
""")

_SPECTRAL_LANE_NOTE = _prose("""
Spectral lane: K Spectral Truncate quantile 0.05 (keys decide background leakage: keep 1-5 %); V Spectral Reweight
log_squared, then Spectral Truncate energy 0.95 (values decide similarity: log^2 flattens the spectrum, energy keeps
its bulk). No masks. They are the recommended preset of Consistent Character (its help page explains them).
""")

_COMPARISON_SAMPLER_NOTE = _prose("""
All three KSamplers: dpmpp_2m karras, 30 steps, cfg 5, the shared seed. dpmpp_2m is deterministic (no noise added
during sampling), so identical seeds and prompts give images that differ only by the model. Change the sampler
settings in all three alike, or the comparison is not fair.
""")

# Lanes: one group per method, stacked; each group's title bar takes the top of its frame.
_LANE_X, _LANE_WIDTH, _GROUP_HEADER, _LANE_GAP = 1000, 1780, 110, 50
_SAMPLER_X = _LANE_X + 820


def _lane_tail(lane: str, top: int) -> list:
    """Sampler, decoder and saver of one lane, all at the lane's first row."""
    return [
        (f"sampler_{lane}", "KSampler", [_SAMPLER_X, top + _GROUP_HEADER], [320, 270], _sampler(5.0),
         f"KSampler ({lane})"),
        (f"decode_{lane}", "VAEDecode", [_SAMPLER_X + 380, top + _GROUP_HEADER], [200, 50], {}),
        (f"save_{lane}", "SaveImage", [_SAMPLER_X + 620, top + _GROUP_HEADER], [300, 300],
         {"filename_prefix": f"spectral_anchors/comparison/{lane}"}, f"Save Image ({lane})"),
    ]


def _lane_links(lane: str) -> list:
    return [
        ("story", "positive", f"sampler_{lane}", "positive"),
        ("story", "negative", f"sampler_{lane}", "negative"),
        ("story", "latent", f"sampler_{lane}", "latent_image"),
        ("seed", "INT", f"sampler_{lane}", "seed"),
        (f"sampler_{lane}", "LATENT", f"decode_{lane}", "samples"),
        ("loader", "VAE", f"decode_{lane}", "vae"),
        (f"decode_{lane}", "IMAGE", f"save_{lane}", "images"),
    ]


def _lane_bottom(nodes: list) -> int:
    return max(node[2][1] + node[3][1] for node in nodes) + 40


_VANILLA_TOP = 40
_vanilla_lane = _lane_tail("vanilla", _VANILLA_TOP)
_CONSISTORY_TOP = _lane_bottom(_vanilla_lane) + _LANE_GAP
_consistory_lane = [
    ("c_attention", "SpectralAnchorAttention", [_LANE_X + 40, _CONSISTORY_TOP + _GROUP_HEADER], [300, 330],
     _CONSISTORY_ATTENTION),
    ("c_injection", "SpectralFeatureInjection", [_LANE_X + 440, _CONSISTORY_TOP + _GROUP_HEADER], [300, 260],
     _INJECTION),
    _note("c_note", [_LANE_X + 440, _CONSISTORY_TOP + _GROUP_HEADER + 330], 300, _CONSISTORY_LANE_NOTE,
          "ConsiStory-style lane"),
    *_lane_tail("consistory", _CONSISTORY_TOP),
]
_SPECTRAL_TOP = _lane_bottom(_consistory_lane) + _LANE_GAP
_spectral_lane = [
    # The spectra start lower than the attention node, so its wide badge row does not cover theirs.
    *_spectra_nodes(_LANE_X + 40, _SPECTRAL_TOP + _GROUP_HEADER + 60, 300),
    ("s_attention", "SpectralAnchorAttention", [_LANE_X + 440, _SPECTRAL_TOP + _GROUP_HEADER], [300, 330],
     _SPECTRAL_ATTENTION),
    _note("s_note", [_LANE_X + 440, _SPECTRAL_TOP + _GROUP_HEADER + 400], 300, _SPECTRAL_LANE_NOTE, "Spectral lane"),
    *_lane_tail("spectral", _SPECTRAL_TOP),
]
_SPECTRAL_BOTTOM = _lane_bottom(_spectral_lane)

_STITCH = {"direction": "right", "match_image_size": True, "spacing_width": 32, "spacing_color": "white"}
_COMBINE_X = _LANE_X + _LANE_WIDTH + 60
_COMBINE_NOTE = _prose("""
The comparison image

- Image Stitch (twice): per scene, vanilla | ConsiStory-style | spectral, left to right, with 32 px white bars.
- Rebatch Images, batch_size 1: Image Grid takes a list of images, not a batch.
- Image Grid, 1 column: one row per scene, in scene order. Cells of 1568 x 512 are the stitched rows at half size
(3 x 1024 + 2 x 32 = 3136 wide), so nothing is distorted at 1024 x 1024; change the cell size with the image size.
- No labels: core ComfyUI cannot draw text on images; this note and the fixed column order are the legend.
""")

_comparison_overview = _note("overview", [40, 40], 440, _COMPARISON_OVERVIEW, "Read me: side-by-side comparison")
_comparison_loader = ("loader", "CheckpointLoaderSimple", [40, _below(_comparison_overview)], [440, 100],
                      {"ckpt_name": SDXL_CHECKPOINT})
_comparison_seed = ("seed", "PrimitiveInt", [40, _below(_comparison_loader)], [440, 82],
                    {"value": SEED, "control_after_generate": "fixed"}, "Seed (shared)")
_comparison_story_note = _note("story_note", [520, 730], 440, _COMPARISON_STORY_NOTE,
                               "Story prompts: identical for all three")

SIDE_BY_SIDE_COMPARISON_SDXL = WorkflowGraph(
    name="side_by_side_comparison_sdxl",
    title=TITLES["side_by_side_comparison_sdxl"],
    nodes=[
        _comparison_overview,
        _comparison_loader,
        _comparison_seed,
        _note("seed_note", [40, _below(_comparison_seed)], 440, _COMPARISON_SEED_NOTE, "Seed: shared by all three"),
        ("story", "SpectralStoryPrompts", [520, 40], [440, 620], _story(_COMPARISON_SCENES, 1024)),
        _comparison_story_note,
        _note("sampler_note", [520, _below(_comparison_story_note)], 440, _COMPARISON_SAMPLER_NOTE,
              "Samplers: identical settings"),
        *_vanilla_lane,
        *_consistory_lane,
        *_spectral_lane,
        ("stitch_1", "ImageStitch", [_COMBINE_X, _CONSISTORY_TOP], [300, 160], _STITCH,
         "Image Stitch (vanilla | ConsiStory)"),
        ("stitch_2", "ImageStitch", [_COMBINE_X, _CONSISTORY_TOP + 230], [300, 160], _STITCH,
         "Image Stitch (... | spectral)"),
        ("rebatch", "RebatchImages", [_COMBINE_X, _CONSISTORY_TOP + 460], [300, 60], {"batch_size": 1}),
        ("grid", "ImageGrid", [_COMBINE_X, _CONSISTORY_TOP + 590], [300, 160],
         {"columns": 1, "cell_width": 1568, "cell_height": 512, "padding": 16}),
        ("save_comparison", "SaveImage", [_COMBINE_X + 360, _CONSISTORY_TOP], [480, 420],
         {"filename_prefix": "spectral_anchors/comparison/comparison"}, "Save Image (comparison)"),
        _note("combine_note", [_COMBINE_X + 360, _CONSISTORY_TOP + 490], 480, _COMBINE_NOTE,
              "The comparison image: no labels in core"),
    ],
    links=[
        ("loader", "CLIP", "story", "clip"),
        ("loader", "MODEL", "sampler_vanilla", "model"),
        ("loader", "MODEL", "c_attention", "model"),
        ("story", "SPECTRAL_STORY", "c_attention", "story"),
        ("c_attention", "MODEL", "c_injection", "model"),
        ("c_injection", "MODEL", "sampler_consistory", "model"),
        ("loader", "MODEL", "s_attention", "model"),
        ("story", "SPECTRAL_STORY", "s_attention", "story"),
        *_spectra_links("s_attention"),
        ("s_attention", "MODEL", "sampler_spectral", "model"),
        *_lane_links("vanilla"),
        *_lane_links("consistory"),
        *_lane_links("spectral"),
        ("decode_vanilla", "IMAGE", "stitch_1", "image1"),
        ("decode_consistory", "IMAGE", "stitch_1", "image2"),
        ("stitch_1", "IMAGE", "stitch_2", "image1"),
        ("decode_spectral", "IMAGE", "stitch_2", "image2"),
        ("stitch_2", "IMAGE", "rebatch", "images"),
        ("rebatch", "IMAGE", "grid", "images"),
        ("grid", "IMAGE", "save_comparison", "images"),
    ],
    groups=[
        ("vanilla: the checkpoint alone, no sharing",
         [_LANE_X, _VANILLA_TOP, _LANE_WIDTH, _lane_bottom(_vanilla_lane) - _VANILLA_TOP], "#444444"),
        ("ConsiStory-style: subject masks, dropout 0.5, query blending, feature injection",
         [_LANE_X, _CONSISTORY_TOP, _LANE_WIDTH, _lane_bottom(_consistory_lane) - _CONSISTORY_TOP], "#2f5a63"),
        ("spectral: K quantile 0.05, V log_squared -> energy 0.95, no masks",
         [_LANE_X, _SPECTRAL_TOP, _LANE_WIDTH, _SPECTRAL_BOTTOM - _SPECTRAL_TOP], "#4a3f6b"),
    ],
)

# ---------------------------------------------------------------- spectrum_plot_sdxl

_PLOT_SCENES = SCENES[:4]
_PLOT_OVERVIEW = _prose("""
Spectrum plot: see what the filters did (SDXL)

The spectral character sheet with four scenes, plus two Spectral Spectrum Plot nodes. They record the singular
values of each anchor's keys (K) and values (V) in one shared layer while sampling, and draw them after sampling:
before the filters (grey-blue) and after (orange), largest first, on a log scale. Values a truncation removed drop
to the floor of the plot.

Wiring: each plot takes its model from Spectral Anchor Attention (what it records on) and its samples from the
KSampler (which makes it run after sampling). The layers a plot asks for are decomposed in full; every other
layer keeps the values its filter computes anyway, so a plot added after a run draws at once (the leading values
only, where the fast solver computed no more) and without a plot nothing extra is computed.

Reading it:
- A steep drop after the first few values: a few directions dominate; truncating there keeps most of the anchor.
- The orange curve ending early is a truncation (K at 5 % of its values; V wherever energy 0.95 is reached).
- An orange curve flatter than the grey one is the log_squared reweighting.
- Plots added after a run show the leading values; queue with the plots connected to see every value.

Choose your SDXL checkpoint and queue; the images and both plots appear in the Preview Image nodes (nothing is
written to output/; swap in Save Image to keep them).
""")

_PLOT_NOTE = _prose("""
Spectral Spectrum Plot knobs

- layer: which shared layer, counted from 0 in forward order among the layers the attention node patches. With
layers = decoder on SDXL there are 36: 0-29 on the 32 x 32 token grid (1024 tokens x 1280 channels at 1024 px),
30-35 on the 64 x 64 grid (4096 tokens x 640 channels). The two plots here show layer 0 (coarse grid) and layer
30 (fine grid). Other layer settings number differently; a layer number too large is reported with the valid range.
- step: the sampling step to plot, 0 the first; -1 (here) the last step that shared.
- One panel per anchor and matrix, titled with the chain that was applied, e.g. "log_squared -> energy(0.95)".
""")

_PLOT_SPECTRA_NOTE = _prose("""
The recommended preset's spectra, as explicit nodes: K Spectral Truncate quantile 0.05 (keys mostly decide
background leakage: keep 1-5 %); V Spectral Reweight log_squared, then Spectral Truncate energy 0.95 (values mostly
decide similarity: log^2 flattens the spectrum, energy keeps its bulk). Change them and queue again to see the
plots change.
""")

_PLOT_SAMPLER_NOTE = _prose("""
KSampler: dpmpp_2m karras, 30 steps, cfg 5, seed fixed (deterministic, so re-queueing with other spectra compares
like with like). The plots read the run this sampler makes.
""")

_plot_overview = _note("overview", [40, 40], 440, _PLOT_OVERVIEW, "Read me: spectrum plot")

SPECTRUM_PLOT_SDXL = WorkflowGraph(
    name="spectrum_plot_sdxl",
    title=TITLES["spectrum_plot_sdxl"],
    nodes=[
        _plot_overview,
        ("loader", "CheckpointLoaderSimple", [40, _below(_plot_overview)], [440, 100], {"ckpt_name": SDXL_CHECKPOINT}),
        ("story", "SpectralStoryPrompts", [520, 40], [440, 620], _story(_PLOT_SCENES, 1024)),
        _note("story_note", [520, 730], 440, _story_note(len(_PLOT_SCENES), 1024, "SDXL"), "Story prompts: the knobs"),
        *_spectra_nodes(1000, 40, 320),
        _note("spectra_note", [1000, 620], 420, _PLOT_SPECTRA_NOTE, "Spectra"),
        ("attention", "SpectralAnchorAttention", [1500, 40], [340, 330], _SPECTRAL_ATTENTION),
        _note("attention_note", [1500, 440], 380, _ATTENTION_NOTE, "Anchor attention: the knobs"),
        ("sampler", "KSampler", [1920, 40], [320, 270], _sampler(5.0)),
        _note("sampler_note", [1920, 380], 320, _PLOT_SAMPLER_NOTE, "Sampler"),
        ("decode", "VAEDecode", [1920, 600], [200, 50], {}),
        ("preview_images", "PreviewImage", [1920, 720], [320, 320], {}, "Preview Image (the scenes)"),
        ("plot_coarse", "SpectralSpectrumPlot", [2300, 40], [300, 110], {"layer": 0, "step": -1},
         "Spectrum plot: layer 0 (the coarse grid)"),
        ("plot_fine", "SpectralSpectrumPlot", [2300, 540], [300, 110], {"layer": 30, "step": -1},
         "Spectrum plot: layer 30 (the fine grid)"),
        ("preview_coarse", "PreviewImage", [2640, 40], [560, 430], {}, "Preview Image (layer 0)"),
        ("preview_fine", "PreviewImage", [2640, 540], [560, 430], {}, "Preview Image (layer 30)"),
        _note("plot_note", [2300, 1040], 900, _PLOT_NOTE, "Spectrum plot: the knobs"),
    ],
    links=[
        *_SPECTRAL_PIPELINE_LINKS,
        ("decode", "IMAGE", "preview_images", "images"),
        ("attention", "MODEL", "plot_coarse", "model"),
        ("sampler", "LATENT", "plot_coarse", "samples"),
        ("plot_coarse", "IMAGE", "preview_coarse", "images"),
        ("attention", "MODEL", "plot_fine", "model"),
        ("sampler", "LATENT", "plot_fine", "samples"),
        ("plot_fine", "IMAGE", "preview_fine", "images"),
    ],
)

# ---------------------------------------------------------------- compare_settings_sdxl

CLIP_VISION_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
_SCORE = {"anchors": 2}
_COMPARE_OVERVIEW = _prose("""
Compare settings with a number: vanilla, ConsiStory-style, spectral (SDXL)

The same four prompts and the same seed go through three models, as in side_by_side_comparison_sdxl, and each
lane's images are scored by Spectral Consistency Score: the mean cosine similarity of the targets' image embeddings
(scenes 3 and 4) to the anchors' mean embedding (scenes 1 and 2). Higher = the character looks more alike to the
image encoder. The three charts are stitched side by side, left to right: vanilla | ConsiStory-style | spectral;
each chart's title gives its score, and each score node shows its full report on the canvas after a run.

- Load CLIP Vision: any encoder you own (CLIP ViT-H/14 from IPAdapter here; ViT-L/14, ViT-bigG/14, SigLIP or
DINOv2 work too). Compare scores only when they come from the same encoder.
- The score rewards anything the images share, backgrounds included. Connect a subject mask per image to the score
nodes' mask input to score the subject alone (the background is set to the encoder's mean colour).
- Prompt alignment (CLIP-T): connect Load Checkpoint's CLIP to each score node's clip input AND load CLIP
ViT-bigG vision (clip_vision_g.safetensors): SDXL's CLIP-G is the text tower that matches it. CLIP-L and the other
encoders have no matching text projection (see the node's help page).

Saved files: spectral_anchors/compare_settings/vanilla_*, consistory_* and spectral_* (the frames of each lane).
The chart strip appears in Preview Image (swap in Save Image to keep it).
""")

_COMPARE_SCORE_NOTE = _prose("""
Spectral Consistency Score (one per lane)

- images: the lane's decoded batch, anchors first. anchors 2 = the story's first two scenes, as in the attention
nodes.
- story: labels each image with its scene in the report.
- clip_vision: the shared Load CLIP Vision.
- reference (unconnected): your own images of the character; targets are then compared with them instead.
- Outputs: score (FLOAT), report (text, also shown in the node), chart (one bar per image, the dashed line is the
score).
""")

_CMP_X, _CMP_WIDTH, _CMP_HEADER, _CMP_GAP = 1000, 1900, 110, 50
_CMP_SAMPLER_X = _CMP_X + 820


def _compare_lane_tail(lane: str, top: int) -> list:
    """Sampler, decoder, saver and score node of one lane, along the lane's first row."""
    row = top + _CMP_HEADER
    return [
        (f"sampler_{lane}", "KSampler", [_CMP_SAMPLER_X, row], [320, 270], _sampler(5.0), f"KSampler ({lane})"),
        (f"decode_{lane}", "VAEDecode", [_CMP_SAMPLER_X + 370, row], [200, 50], {}),
        (f"save_{lane}", "SaveImage", [_CMP_SAMPLER_X + 370, row + 120], [200, 260],
         {"filename_prefix": f"spectral_anchors/compare_settings/{lane}"}, f"Save Image ({lane})"),
        (f"score_{lane}", "SpectralConsistencyScore", [_CMP_SAMPLER_X + 620, row], [460, 360], _SCORE,
         f"Consistency score ({lane})"),
    ]


def _compare_lane_links(lane: str) -> list:
    return [
        ("story", "positive", f"sampler_{lane}", "positive"),
        ("story", "negative", f"sampler_{lane}", "negative"),
        ("story", "latent", f"sampler_{lane}", "latent_image"),
        ("seed", "INT", f"sampler_{lane}", "seed"),
        (f"sampler_{lane}", "LATENT", f"decode_{lane}", "samples"),
        ("loader", "VAE", f"decode_{lane}", "vae"),
        (f"decode_{lane}", "IMAGE", f"save_{lane}", "images"),
        (f"decode_{lane}", "IMAGE", f"score_{lane}", "images"),
        ("clip_vision", "CLIP_VISION", f"score_{lane}", "clip_vision"),
        ("story", "SPECTRAL_STORY", f"score_{lane}", "story"),
    ]


_CMP_VANILLA_TOP = 40
_cmp_vanilla = _compare_lane_tail("vanilla", _CMP_VANILLA_TOP)
_CMP_CONSISTORY_TOP = _lane_bottom(_cmp_vanilla) + _CMP_GAP
_cmp_consistory = [
    ("c_attention", "SpectralAnchorAttention", [_CMP_X + 40, _CMP_CONSISTORY_TOP + _CMP_HEADER], [300, 330],
     _CONSISTORY_ATTENTION),
    ("c_injection", "SpectralFeatureInjection", [_CMP_X + 440, _CMP_CONSISTORY_TOP + _CMP_HEADER], [300, 260],
     _INJECTION),
    *_compare_lane_tail("consistory", _CMP_CONSISTORY_TOP),
]
_CMP_SPECTRAL_TOP = _lane_bottom(_cmp_consistory) + _CMP_GAP
_cmp_spectral = [
    *_spectra_nodes(_CMP_X + 40, _CMP_SPECTRAL_TOP + _CMP_HEADER + 60, 300),
    ("s_attention", "SpectralAnchorAttention", [_CMP_X + 440, _CMP_SPECTRAL_TOP + _CMP_HEADER], [300, 330],
     _SPECTRAL_ATTENTION),
    *_compare_lane_tail("spectral", _CMP_SPECTRAL_TOP),
]
_CMP_BOTTOM = _lane_bottom(_cmp_spectral)
_CMP_CHARTS_X = _CMP_X + _CMP_WIDTH + 60

_compare_overview = _note("overview", [40, 40], 440, _COMPARE_OVERVIEW, "Read me: compare settings with scores")
_compare_loader = ("loader", "CheckpointLoaderSimple", [40, _below(_compare_overview)], [440, 100],
                   {"ckpt_name": SDXL_CHECKPOINT})
_compare_clip_vision = ("clip_vision", "CLIPVisionLoader", [40, _below(_compare_loader)], [440, 82],
                        {"clip_name": CLIP_VISION_FILE}, "Load CLIP Vision (the scores' encoder)")
_compare_seed = ("seed", "PrimitiveInt", [40, _below(_compare_clip_vision)], [440, 82],
                 {"value": SEED, "control_after_generate": "fixed"}, "Seed (shared)")
_compare_story_note = _note("story_note", [520, 730], 440, _COMPARISON_STORY_NOTE,
                            "Story prompts: identical for all three")

COMPARE_SETTINGS_SDXL = WorkflowGraph(
    name="compare_settings_sdxl",
    nodes=[
        _compare_overview,
        _compare_loader,
        _compare_clip_vision,
        _compare_seed,
        _note("seed_note", [40, _below(_compare_seed)], 440, _COMPARISON_SEED_NOTE, "Seed: shared by all three"),
        ("story", "SpectralStoryPrompts", [520, 40], [440, 620], _story(_COMPARISON_SCENES, 1024)),
        _compare_story_note,
        _note("sampler_note", [520, _below(_compare_story_note)], 440, _COMPARISON_SAMPLER_NOTE,
              "Samplers: identical settings"),
        *_cmp_vanilla,
        *_cmp_consistory,
        *_cmp_spectral,
        ("chart_stitch_1", "ImageStitch", [_CMP_CHARTS_X, _CMP_VANILLA_TOP], [300, 160], _STITCH,
         "Image Stitch (vanilla | ConsiStory)"),
        ("chart_stitch_2", "ImageStitch", [_CMP_CHARTS_X, _CMP_VANILLA_TOP + 230], [300, 160], _STITCH,
         "Image Stitch (... | spectral)"),
        ("preview_charts", "PreviewImage", [_CMP_CHARTS_X + 360, _CMP_VANILLA_TOP], [720, 400], {},
         "Preview Image (the three charts)"),
        _note("score_note", [_CMP_CHARTS_X, _CMP_VANILLA_TOP + 470], 440, _COMPARE_SCORE_NOTE,
              "Consistency scores: the knobs"),
    ],
    links=[
        ("loader", "CLIP", "story", "clip"),
        ("loader", "MODEL", "sampler_vanilla", "model"),
        ("loader", "MODEL", "c_attention", "model"),
        ("story", "SPECTRAL_STORY", "c_attention", "story"),
        ("c_attention", "MODEL", "c_injection", "model"),
        ("c_injection", "MODEL", "sampler_consistory", "model"),
        ("loader", "MODEL", "s_attention", "model"),
        ("story", "SPECTRAL_STORY", "s_attention", "story"),
        *_spectra_links("s_attention"),
        ("s_attention", "MODEL", "sampler_spectral", "model"),
        *_compare_lane_links("vanilla"),
        *_compare_lane_links("consistory"),
        *_compare_lane_links("spectral"),
        ("score_vanilla", "chart", "chart_stitch_1", "image1"),
        ("score_consistory", "chart", "chart_stitch_1", "image2"),
        ("chart_stitch_1", "IMAGE", "chart_stitch_2", "image1"),
        ("score_spectral", "chart", "chart_stitch_2", "image2"),
        ("chart_stitch_2", "IMAGE", "preview_charts", "images"),
    ],
    groups=[
        ("vanilla: the checkpoint alone, no sharing",
         [_CMP_X, _CMP_VANILLA_TOP, _CMP_WIDTH, _lane_bottom(_cmp_vanilla) - _CMP_VANILLA_TOP], "#444444"),
        ("ConsiStory-style: subject masks, dropout 0.5, query blending, feature injection",
         [_CMP_X, _CMP_CONSISTORY_TOP, _CMP_WIDTH, _lane_bottom(_cmp_consistory) - _CMP_CONSISTORY_TOP], "#2f5a63"),
        ("spectral: K quantile 0.05, V log_squared -> energy 0.95, no masks",
         [_CMP_X, _CMP_SPECTRAL_TOP, _CMP_WIDTH, _CMP_BOTTOM - _CMP_SPECTRAL_TOP], "#4a3f6b"),
    ],
)

# ---------------------------------------------------------------- reference_character_sdxl

_REFERENCE_OVERVIEW = _prose("""
Use your own character (SDXL)

Your own image of the character is the anchor: Load Image (put your picture in ComfyUI's input folder) is scaled
to the sampling size and encoded, and both Spectral Story Prompts and Spectral Reference Anchors get the encoded
reference. Every run of the batch starts with the reference row, then one row per scene; at every step the
reference is noised to the current level with the model's own formula, the scenes share its keys and values
through Spectral Anchor Attention (with the recommended spectra), and its prediction is replaced by the
reference itself, so it comes out unchanged. No training, no inversion.

How to use: choose your SDXL checkpoint and your image, describe the character in subject as the image shows it,
write one scene per line, queue. Spectral Sheet lays out the reference and the scenes; turn reference_cells off
for the scenes alone. More references (a batch from VAE Encode, up to 8): set anchors of Spectral Anchor Attention
to their number.
""")

_REFERENCE_NOTE = _prose("""
The reference: size and prompt

- Image Scale (lanczos, centre crop) brings the image to the sampling size before VAE Encode: that gives better
quality than letting the nodes resize the latent (they would scale and centre-crop it too).
- Spectral Story Prompts, reference_prompt: empty = the subject alone in the style template; write what the image
shows if that differs (and keep the subject word for subject masks).
- Spectral Reference Anchors, noise_seed: the one fixed noise the reference is re-noised with at every step.
- Spectral Anchor Attention, anchors: the number of references (1 here); the node says so clearly otherwise.
- Spectra: K quantile 0.05 keeps the reference's background out of the scenes; V log_squared -> energy 0.95 carries
the subject.
""")

_REFERENCE_ATTENTION = {**_SPECTRAL_ATTENTION, "anchors": 1}
_REFERENCE_STORY = {**_story(SCENES[:4], 1024), "anchors": 1, "images_per_batch": 0, "reference_prompt": ""}

_reference_overview = _note("overview", [40, 40], 440, _REFERENCE_OVERVIEW, "Read me: use your own character")
REFERENCE_CHARACTER_SDXL = WorkflowGraph(
    name="reference_character_sdxl",
    nodes=[
        _reference_overview,
        ("loader", "CheckpointLoaderSimple", [40, _below(_reference_overview)], [440, 100],
         {"ckpt_name": SDXL_CHECKPOINT}),
        ("image", "LoadImage", [520, 40], [320, 360], {"image": "example.png"}, "Load Image (your character)"),
        ("scale", "ImageScale", [520, 470], [320, 160],
         {"upscale_method": "lanczos", "width": 1024, "height": 1024, "crop": "center"}),
        ("encode", "VAEEncode", [520, 700], [320, 60], {}),
        _note("reference_note", [520, 830], 420, _REFERENCE_NOTE, "The reference: the knobs"),
        ("story", "SpectralStoryPrompts", [980, 40], [440, 700], _REFERENCE_STORY),
        *_spectra_nodes(1460, 40, 320),
        ("attention", "SpectralAnchorAttention", [1820, 40], [340, 330], _REFERENCE_ATTENTION),
        ("references", "SpectralReferenceAnchors", [1820, 440], [340, 110],
         {"noise_seed": 0, "control_after_generate": "fixed"}),
        ("sampler", "KSampler", [2200, 40], [320, 270], _sampler(5.0)),
        ("decode", "VAEDecode", [2560, 40], [200, 50], {}),
        ("sheet", "SpectralSheet", [2560, 160], [300, 200],
         {"columns": 0, "labels": True, "padding": 8, "reference_cells": True}),
        ("save_frames", "SaveImage", [2900, 40], [320, 300],
         {"filename_prefix": "spectral_anchors/reference_character_sdxl/frame"}, "Save Image (frames)"),
        ("save_sheet", "SaveImage", [2900, 420], [420, 320],
         {"filename_prefix": "spectral_anchors/reference_character_sdxl/sheet"}, "Save Image (sheet)"),
    ],
    links=[
        ("image", "IMAGE", "scale", "image"),
        ("scale", "IMAGE", "encode", "pixels"),
        ("loader", "VAE", "encode", "vae"),
        ("encode", "LATENT", "story", "reference"),
        ("encode", "LATENT", "references", "reference"),
        ("loader", "CLIP", "story", "clip"),
        ("loader", "MODEL", "attention", "model"),
        *_spectra_links("attention"),
        ("story", "SPECTRAL_STORY", "attention", "story"),
        ("attention", "MODEL", "references", "model"),
        ("references", "MODEL", "sampler", "model"),
        ("story", "positive", "sampler", "positive"),
        ("story", "negative", "sampler", "negative"),
        ("story", "latent", "sampler", "latent_image"),
        ("sampler", "LATENT", "decode", "samples"),
        ("loader", "VAE", "decode", "vae"),
        ("decode", "IMAGE", "sheet", "images"),
        ("story", "SPECTRAL_STORY", "sheet", "story"),
        ("sheet", "images", "save_frames", "images"),
        ("sheet", "sheet", "save_sheet", "images"),
    ],
)

# ---------------------------------------------------------------- character_sheet_long_sdxl

_LONG_SCENES = SCENES + [
    "bargaining at a spice market stall",
    "climbing a lighthouse staircase in a storm",
    "reading by candlelight in an old library",
    "crossing a rope bridge over a canyon",
    "feeding pigeons in a sunny town square",
    "waving goodbye from a steam train window",
]
_LONG_PER_BATCH = 4

_LONG_OVERVIEW = _prose(f"""
Long character sheet (SDXL): {len(_LONG_SCENES)} scenes in runs of {_LONG_PER_BATCH}

One character, {len(_LONG_SCENES)} scenes, sampled in the memory of a batch of {_LONG_PER_BATCH}. Spectral Story
Prompts splits the story into sampler runs (images_per_batch {_LONG_PER_BATCH}): every run holds the 2 anchors
again, then the next 2 scenes. A target sees only itself and the anchors, so every image comes out as it would in
one batch of {len(_LONG_SCENES)} (exactly, with a deterministic sampler such as dpmpp_2m here), and the anchors come
out identical in every run.

The story's positive, negative and latent are lists, one entry per run: the KSampler and VAE Decode run once per
run by themselves (5 runs here). Spectral Sheet takes the images of all runs and gives every scene once, in scene
order, and one labelled sheet.

Cost: memory is that of a batch of {_LONG_PER_BATCH}, whatever the story's length. Compute: each run after the first
samples the 2 anchors again: 20 images for 12 scenes (1.67x). A larger images_per_batch repeats the anchors less
often but needs more memory: see the note next to the story and the README's "Long character sheets".
""")

_LONG_STORY_NOTE = _prose(f"""
Spectral Story Prompts: the run settings

- anchors 2: the first 2 scenes are the anchors, repeated at the start of every run. It must equal Spectral Anchor
Attention's anchors (a different value is an error naming both inputs).
- images_per_batch {_LONG_PER_BATCH}: images per sampler run (anchors included), so each run adds 2 new scenes.
Choose the largest batch your GPU samples at this size without running out of memory (try that batch size once);
anchors + 2 or more keeps the repeated work low. 0 samples the whole story in one batch.
- The latent of each run carries batch_index, the images' places in the one-batch story, so each scene gets the
noise it would get in one batch (same_noise: all the same noise).
- Up to 512 scenes when split (64 in one batch).
- Samplers: deterministic ones (dpmpp_2m, euler, ddim, uni_pc ...) give every image exactly its one-batch result.
Ancestral and SDE samplers give identical anchors in every run, but the targets draw other (equally valid)
per-step noise than in one batch.
""")

_LONG_SHEET_NOTE = _prose("""
Spectral Sheet: the story put back together

- images: the VAE Decode of every run (it receives all runs at once).
- story: the same story, so it knows which image is which scene and which are repeated anchors.
- columns 0: automatic, 4 x 3 for twelve square images. labels on: each scene's line under its cell (Pillow's
built-in font).
- Save Image (frames) writes each scene once, in scene order; Save Image (sheet) the grid.
- Keep the lists in order: a run's positive, negative and latent must stay together (a mix-up is an error).
""")

_long_overview = _note("overview", [40, 40], 440, _LONG_OVERVIEW, "Read me: long character sheet")
_long_story_note = _note("story_note", [520, 730], 440, _LONG_STORY_NOTE, "Story prompts: runs of 4")

CHARACTER_SHEET_LONG_SDXL = WorkflowGraph(
    name="character_sheet_long_sdxl",
    nodes=[
        _long_overview,
        ("loader", "CheckpointLoaderSimple", [40, _below(_long_overview)], [440, 100], {"ckpt_name": SDXL_CHECKPOINT}),
        ("story", "SpectralStoryPrompts", [520, 40], [440, 620],
         {**_story(_LONG_SCENES, 1024), "anchors": 2, "images_per_batch": _LONG_PER_BATCH}),
        _long_story_note,
        *_spectra_nodes(1000, 40, 320),
        _note("spectra_note", [1000, 620], 460, _SPECTRA_NOTE, "Spectra: why these settings"),
        ("attention", "SpectralAnchorAttention", [1500, 40], [340, 330], _SPECTRAL_ATTENTION),
        _note("attention_note", [1500, 440], 400, _ATTENTION_NOTE, "Anchor attention: the knobs"),
        ("sampler", "KSampler", [1940, 40], [320, 270], _sampler(5.0)),
        _note("sampler_note", [1940, 440], 360, _SAMPLER_NOTE, "Sampler: why these settings"),
        ("decode", "VAEDecode", [2340, 40], [200, 50], {}),
        ("sheet", "SpectralSheet", [2340, 180], [260, 130], {"columns": 0, "labels": True, "padding": 8}),
        _note("sheet_note", [2340, 440], 420, _LONG_SHEET_NOTE, "Spectral Sheet: the knobs"),
        ("save_frames", "SaveImage", [2660, 40], [320, 300],
         {"filename_prefix": "spectral_anchors/character_sheet_long_sdxl/frame"}, "Save Image (frames)"),
        ("save_sheet", "SaveImage", [3020, 40], [420, 320],
         {"filename_prefix": "spectral_anchors/character_sheet_long_sdxl/sheet"}, "Save Image (sheet)"),
    ],
    links=[
        *_SPECTRAL_PIPELINE_LINKS,
        ("decode", "IMAGE", "sheet", "images"),
        ("story", "SPECTRAL_STORY", "sheet", "story"),
        ("sheet", "images", "save_frames", "images"),
        ("sheet", "sheet", "save_sheet", "images"),
    ],
)

WORKFLOWS = {graph.name: graph for graph in (
    SPECTRAL_CHARACTER_SHEET_SDXL, SPECTRAL_CHARACTER_SHEET_SD15, SIDE_BY_SIDE_COMPARISON_SDXL,
    CONSISTORY_BASELINE_SDXL, SPECTRUM_PLOT_SDXL, ANCHOR_ATTENTION_BASIC, COMPARE_SETTINGS_SDXL,
    REFERENCE_CHARACTER_SDXL, CHARACTER_SHEET_LONG_SDXL)}
