from stampbatch.cli import main

raise SystemExit(main())
