"""``python -m shmpool`` runs the demo (see ``shmpool._demo``);
``python -m shmpool doctor`` checks the machine (see ``shmpool._doctor``)."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["doctor"]:
        from ._doctor import main as doctor
        sys.exit(doctor(sys.argv[2:]))
    if {"-h", "--help"} & set(sys.argv[1:]):
        print("python -m shmpool doctor [--capacity BYTES]: check that this machine can run "
              "shmpool (/dev/shm, RemoveIPC, start methods, ...)\n")
    from ._demo import main
    main()
