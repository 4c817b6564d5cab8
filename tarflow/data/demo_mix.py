"""A miniature of Tar's training mix, made from the bundled sample's photos: LLaVA-style conversation Parquet
files as the reference's corpora are published on the Hub, and a mix file in the shape of the reference's
`scripts/data_demo.yaml`. What `make demo`'s conversation steps tokenize and train on (offline, no download).

    folder/
      llava-recap/data/train-00000-of-00001.parquet   I2T: each photo with its caption    (as LLaVA-ReCap)
      llava-sft/data/train-00000-of-00001.parquet     a question over two photos, text-only rows with a null
                                                      image                                (as LLaVA-SFT-665K)
      t2i/data/train-00000-of-00001.parquet           T2I: a caption, answered by the photo (as ImageNet1K-T2I)
      edit/data/train-00000-of-00001.parquet          an edit: photo + instruction -> the edited photo (the
                                                      paper's image-to-image pre-training task)
      text/data/train-00000-of-00001.parquet          text only, no image column          (as Magpie)
      mix.yaml                                        the sources by ratio (reference: 2 / 4 / 1; edit: 1)

Row format (as the Hub's Parquet): `id` string; `image` an HF Image struct {bytes, path}, a list of them (several
images, in `<image>` order), or null; `conversations` list<struct<from, value>>, where every `<image>` in any
turn stands for the row's next image: in a human turn an image the model reads, in a gpt turn one it writes.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

IMAGE_MARK = "<image>"
DATA_FILE = "train-00000-of-00001.parquet"
MIX_FILE = "mix.yaml"
EDIT_INSTRUCTION = "Flip the photo from left to right."
TWO_IMAGE_QUESTION = "Describe the second image shortly."
# (question, answer) turns of the text-only rows: short, so that the demo's tiny model can learn them
TEXT_ROWS = [
    [("What is a tripod?", "A three-legged stand that holds a camera steady.")],
    [("What is the Hubble deep field?", "A long exposure of a small patch of sky full of distant galaxies.")],
    [("Name a hot drink.", "Coffee."), ("And a cold one?", "Iced tea.")],
    [("How many legs does a horse have?", "Four.")],
]


@dataclass(frozen=True)
class MixGroup:
    """One entry of the mix file: sources drawn together at `ratio` (the reference's {json_path, ratio, name})."""
    name: str
    ratio: int
    sources: tuple[str, ...]
    like: str  # the reference corpus it stands in for


# the reference's demo recipe, source for source, plus the edit task it has no public corpus for
DEMO_MIX = (
    MixGroup("understanding", 2, ("llava-recap", "llava-sft"), "LLaVA-ReCap-118K/558K, LLaVA-SFT-665K"),
    MixGroup("generation", 4, ("t2i",), "ImageNet1K-T2I-QwenVL-FLUX"),
    MixGroup("editing", 1, ("edit",), "the paper's image-to-image pre-training task"),
    MixGroup("text", 1, ("text",), "Magpie-Qwen2.5-Pro-1M"),
)


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    return [t for q, a in pairs for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def _image(name: str, data: bytes) -> dict:
    return {"bytes": data, "path": f"{name}.jpg"}


def _mirrored(data: bytes) -> bytes:
    from PIL import Image, ImageOps

    im = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    ImageOps.mirror(im).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def demo_conversation_rows(photos: list[tuple[str, bytes, str]], question: str) -> dict[str, list[dict]]:
    """The rows of each source (name -> rows), from (name, JPEG bytes, caption) photos; deterministic."""
    n = len(photos)
    recap = [{"id": f"recap-{name}", "image": _image(name, data),
              "conversations": _turns((f"{IMAGE_MARK}\n{question}", caption))} for name, data, caption in photos]
    sft = [{"id": f"sft-{a[0]}-{b[0]}", "image": [_image(a[0], a[1]), _image(b[0], b[1])],
            "conversations": _turns((f"{IMAGE_MARK}\n{IMAGE_MARK}\n{TWO_IMAGE_QUESTION}", b[2]))}
           for a, b in ((photos[k], photos[(k + 1) % n]) for k in range(n))]
    sft.append({"id": "sft-text-0", "image": None, "conversations": _turns(*TEXT_ROWS[0])})
    t2i = [{"id": f"t2i-{name}", "image": _image(name, data), "conversations": _turns((caption, IMAGE_MARK))}
           for name, data, caption in photos]
    edit = [{"id": f"edit-{name}", "image": [_image(name, data), _image(f"{name}-mirrored", _mirrored(data))],
             "conversations": _turns((f"{IMAGE_MARK}\n{EDIT_INSTRUCTION}", IMAGE_MARK))}
            for name, data, _ in photos]
    text = [{"id": f"text-{k}", "conversations": _turns(*pairs)} for k, pairs in enumerate(TEXT_ROWS)]
    return {"llava-recap": recap, "llava-sft": sft, "t2i": t2i, "edit": edit, "text": text}


def _schema(rows: list[dict]):
    """The Hub's types: conversations list<struct<from, value>>; image an Image struct, a list of them, or none."""
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [("id", pa.string())]
    present = [r["image"] for r in rows if r.get("image") is not None]
    if "image" in rows[0]:
        fields.append(("image", pa.list_(image) if present and isinstance(present[0], list) else image))
    fields.append(("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))))
    return pa.schema(fields)


def write_mix_config(path: str | Path, groups: list[tuple[list[str], int, str]]) -> Path:
    """A mix file in the reference's data_demo.yaml shape: `datasets:` [{json_path: [folders], ratio, name}], one
    entry per (folders, ratio, comment)."""
    import yaml

    path = Path(path)
    body = yaml.safe_dump({"datasets": [{"json_path": [str(f) for f in folders], "ratio": int(ratio),
                                         "name": "parquet"} for folders, ratio, _ in groups]}, sort_keys=False)
    notes = "".join(f"#   {k + 1}. ratio {r}: {c}\n" for k, (_, r, c) in enumerate(groups))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# tarflow's demo mix, in the shape of Tar's scripts/data_demo.yaml:\n" + notes + body)
    return path


def write_demo_mix(folder: str | Path, photos: list[tuple[str, bytes, str]] | None = None,
                   question: str | None = None) -> Path:
    """Write the demo conversation sources under `folder` (see the module docstring) from `photos` (default: the
    bundled sample's) and the mix file naming them; return the mix file's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tarflow.data.sample import DEMO_QUESTION, sample_photos

    folder = Path(folder).absolute()
    rows = demo_conversation_rows(photos if photos is not None else sample_photos(), question or DEMO_QUESTION)
    for name, source in rows.items():
        data = folder / name / "data"
        data.mkdir(parents=True, exist_ok=True)
        tmp = data / f".{DATA_FILE}.tmp"
        pq.write_table(pa.Table.from_pylist(source, schema=_schema(source)), tmp)
        tmp.replace(data / DATA_FILE)
    return write_mix_config(folder / MIX_FILE, [([folder / s / "data" for s in g.sources], g.ratio,
                                                 f"{g.name} ({', '.join(g.sources)}; as {g.like})") for g in DEMO_MIX])
