"""Prompt sets: a text file (one prompt per line), a JSONL file (`{"caption": ..., "id": ...}` per line) or a
COCO captions JSON (`{"annotations": [{"image_id", "id", "caption"}, ...]}`)."""

import json
from dataclasses import dataclass
from pathlib import Path

from ldm.errors import UserError


@dataclass(frozen=True)
class Prompt:
    """One prompt of a set; `id` is the set's own identifier (COCO caption id, JSONL id, or line number)."""

    id: str
    caption: str


def _jsonl_prompts(path: Path, text: str) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path}:{number} is not JSON ({error.msg}): write one JSON object per line"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
            raise UserError(f'{path}:{number} has no "caption" string: write {{"caption": ..., "id": ...}}')
        prompts.append(Prompt(str(record.get("id", number - 1)), record["caption"].strip()))
    return prompts


def _coco_prompts(path: Path, text: str) -> list[Prompt]:
    data = json.loads(text)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or not all(
        isinstance(a, dict) and isinstance(a.get("caption"), str) for a in annotations
    ):
        raise UserError(
            f"{path} is not a COCO captions file: it needs annotations [{{image_id, id, caption}}]"
        )
    return [Prompt(str(a.get("id", i)), a["caption"].strip()) for i, a in enumerate(annotations)]


def load_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a `.txt`, `.jsonl` or COCO `.json` file, in file order (empty lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"prompt file {path} not found: pass --prompts with a .txt, .jsonl or COCO .json file"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        prompts = _jsonl_prompts(path, text)
    elif path.suffix == ".json":
        prompts = _coco_prompts(path, text)
    else:
        lines = [line.strip() for line in text.splitlines()]
        prompts = [Prompt(str(i), line) for i, line in enumerate(lines) if line]
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts
