if __name__ == "__main__":
    from syncd.cli import main

    raise SystemExit(main())
