"""Shared by the notebooks/make_*_notebook.py generators: cells -> .ipynb, optionally executed.

A generator lists its cells as ("md" | "code", source) pairs and calls
``main(cells, path, description)``; ``--execute`` runs the notebook with
nbclient in this folder and stores its outputs.
"""

from __future__ import annotations

import argparse
import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))


def build_notebook(cells) -> nbformat.NotebookNode:
    notebook = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                                   for kind, src in cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    return notebook


def main(cells, path: str, description: str, argv=None) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--execute", action="store_true",
                        help="run the notebook (nbclient) and store its outputs")
    parser.add_argument("--output", default=path)
    args = parser.parse_args(argv)
    notebook = build_notebook(cells)
    if args.execute:
        from nbclient import NotebookClient

        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": HERE}}).execute()
    nbformat.validate(notebook)
    nbformat.write(notebook, args.output)
    print(f"wrote {args.output}")
