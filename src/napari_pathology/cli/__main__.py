"""``python -m napari_pathology.cli``: the ``napari-pathology`` command."""

from napari_pathology.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
