"""``python -m shmpool`` runs the demo (see ``shmpool._demo``)."""

from ._demo import main

main()
