"""``python -m mosaic_backend``: the same as the ``mosaic-backend`` command."""
from .cli import main

main()
