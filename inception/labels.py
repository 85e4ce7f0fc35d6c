"""ImageNet-1k class names in the checkpoints' class order.

Generated once from the class metadata that the timm package ships (no network) and
committed as `data/imagenet_labels.txt`; `python -m inception.labels` regenerates it.
timm's checkpoints have 1000 outputs and no background class, so logit i is line i.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

LABELS_PATH = Path(__file__).with_name("data") / "imagenet_labels.txt"
#: The same classes as WordNet synsets (`n01440764`), the names of ImageNet's folders.
SYNSETS_PATH = Path(__file__).with_name("data") / "imagenet_synsets.txt"


def _timm_info_dir() -> Path:
    # Locate timm's data files without importing timm (which imports torchvision).
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("timm is not installed: install the 'reference' extra to regenerate labels")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "_info"


def generate_synsets() -> list[str]:
    return _timm_info_dir().joinpath("imagenet_synsets.txt").read_text().split()


def generate_labels() -> list[str]:
    info = _timm_info_dir()
    synsets = generate_synsets()
    lemmas = dict(
        line.split("\t", 1) for line in info.joinpath("imagenet_synset_to_lemma.txt").read_text().splitlines()
    )
    return [lemmas[s].strip() for s in synsets]


def main() -> None:
    labels = generate_labels()
    LABELS_PATH.write_text("\n".join(labels) + "\n")
    SYNSETS_PATH.write_text("\n".join(generate_synsets()) + "\n")
    print(f"wrote {len(labels)} labels to {LABELS_PATH} and their synsets to {SYNSETS_PATH}")


if __name__ == "__main__":
    main()
