"""Execute a notebook with parameters, papermill style (papermill is not a dependency): the values
go into a new cell right after the cell tagged `parameters`, so they override its defaults."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PARAMETERS_TAG = "parameters"


def parameters_cell_index(nb) -> int:
    """Index of the code cell tagged `parameters`; a notebook without one is named with the fix."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and PARAMETERS_TAG in cell.get("metadata", {}).get("tags", []):
            return i
    raise ValueError("the notebook has no code cell tagged 'parameters'; tag the cell holding its defaults "
                     "(cell metadata: {\"tags\": [\"parameters\"]})")


def inject_parameters(nb, parameters: dict[str, Any]) -> None:
    """Insert `NAME = repr(value)` lines after the parameters cell (in place). Values must round-trip
    through repr (str, numbers, bools, None, lists/dicts/tuples of them)."""
    import ast

    import nbformat

    idx = parameters_cell_index(nb)
    lines = []
    for name, value in parameters.items():
        if not str(name).isidentifier():
            raise ValueError(f"parameter name {name!r} is not a Python identifier")
        text = repr(value)
        try:
            if ast.literal_eval(text) != value:
                raise ValueError
        except (ValueError, SyntaxError):
            raise ValueError(f"parameter {name}={value!r} does not survive repr(); pass str, numbers, bools, "
                             "None, or lists/dicts of them") from None
        lines.append(f"{name} = {text}")
    cell = nbformat.v4.new_code_cell("# injected parameters\n" + "\n".join(lines))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, cell)


def execute(path: str | os.PathLike, parameters: dict[str, Any] | None = None, *, timeout: int = 600,
            cwd: str | os.PathLike | None = None, save_to: str | os.PathLike | None = None):
    """Run the notebook at `path` top to bottom (kernel python3), with `parameters` injected; returns
    the executed notebook (and writes it to `save_to` if given). A failing cell raises nbclient's
    CellExecutionError naming the cell and the error."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(Path(path), as_version=4)
    if parameters:
        inject_parameters(nb, parameters)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd or Path(path).parent)}})
    client.execute()
    if save_to is not None:
        from ditq.utils.atomic import atomic_write_text

        atomic_write_text(save_to, nbformat.writes(nb))
    return nb


def images(nb) -> list[str]:
    """The base64 PNGs the executed notebook displayed, in order."""
    return [o["data"]["image/png"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]


def text(nb) -> str:
    """Everything the executed notebook printed or displayed as text (streams and text/plain)."""
    parts = []
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        for o in c.get("outputs", []):
            parts.append(o.get("text", ""))
            parts.append(o.get("data", {}).get("text/plain", ""))
    return "".join(parts)
