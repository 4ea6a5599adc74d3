# Guarded: a transform worker process (multiprocessing's spawn) imports this module under another
# name, and then needs none of what the command line pulls in.
if __name__ == "__main__":
    from syncd.cli import main

    raise SystemExit(main())
