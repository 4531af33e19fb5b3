"""Nucleus class schemes.

The class list (ids, names, colours) belongs to a model checkpoint, never to the pipeline: every
stage receives a :class:`ClassScheme`. Id 0 is always background and is not part of ``classes``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from conic_qp.errors import ConicQPError

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class NucleusClass:
    """One nucleus class: its integer id in label maps, its name and its display colour."""

    id: int
    name: str
    color: RGB

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "color": list(self.color)}


@dataclass(frozen=True)
class ClassScheme:
    """Ordered nucleus classes with ids 1..C (0 is background)."""

    name: str
    classes: tuple[NucleusClass, ...]

    def __post_init__(self) -> None:
        ids = [c.id for c in self.classes]
        if ids != list(range(1, len(ids) + 1)):
            raise ConicQPError(
                f"class scheme {self.name!r} has ids {ids}; ids must be 1..C in order "
                "(0 is background)"
            )
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ConicQPError(f"class scheme {self.name!r} has duplicate class names {names}")
        for c in self.classes:
            if len(c.color) != 3 or not all(0 <= v <= 255 for v in c.color):
                raise ConicQPError(f"class {c.name!r} colour {c.color} is not an RGB triple 0-255")

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self) -> Iterator[NucleusClass]:
        return iter(self.classes)

    @property
    def n_classes(self) -> int:
        """Number of nucleus classes C (background excluded)."""
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def by_id(self, class_id: int) -> NucleusClass:
        if not 1 <= class_id <= len(self.classes):
            raise ConicQPError(
                f"class id {class_id} is not in scheme {self.name!r} (1..{len(self)})"
            )
        return self.classes[class_id - 1]

    def by_name(self, name: str) -> NucleusClass:
        for c in self.classes:
            if c.name == name:
                return c
        raise ConicQPError(
            f"unknown class name {name!r}; scheme {self.name!r} has {', '.join(self.names)}"
        )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "classes": [c.to_json() for c in self.classes]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClassScheme:
        try:
            classes = tuple(
                NucleusClass(int(c["id"]), str(c["name"]), tuple(int(v) for v in c["color"]))  # type: ignore[arg-type]
                for c in data["classes"]
            )
            return cls(str(data.get("name", "custom")), classes)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConicQPError(
                f"malformed class list ({exc!r}); expected {{'classes': [{{'id', 'name', 'color'}}]}}"
            ) from exc

    @classmethod
    def from_names(
        cls, name: str, names: Sequence[str], colors: Sequence[RGB] | None = None
    ) -> ClassScheme:
        """Build a scheme from names; colours default to a fixed qualitative palette."""
        colors = (
            list(colors)
            if colors is not None
            else [PALETTE[i % len(PALETTE)] for i in range(len(names))]
        )
        return cls(name, tuple(NucleusClass(i + 1, n, colors[i]) for i, n in enumerate(names)))


# Qualitative palette for schemes without declared colours (colour-blind friendly, Okabe-Ito).
PALETTE: tuple[RGB, ...] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (0, 0, 0),
)

#: Lizard / CoNIC 2022 classes (ids as in the challenge labels); colours as in the CoNIC overlays.
CONIC = ClassScheme(
    "conic",
    (
        NucleusClass(1, "neutrophil", (0, 0, 255)),
        NucleusClass(2, "epithelial", (255, 0, 0)),
        NucleusClass(3, "lymphocyte", (0, 255, 0)),
        NucleusClass(4, "plasma", (0, 191, 255)),
        NucleusClass(5, "eosinophil", (255, 0, 255)),
        NucleusClass(6, "connective", (255, 255, 0)),
    ),
)

#: CoNSeP classes (Graham et al. 2019, merged scheme used by HoVer-Net).
CONSEP = ClassScheme(
    "consep",
    (
        NucleusClass(1, "other", (255, 165, 0)),
        NucleusClass(2, "inflammatory", (0, 255, 0)),
        NucleusClass(3, "epithelial", (255, 0, 0)),
        NucleusClass(4, "spindle", (0, 0, 255)),
    ),
)
