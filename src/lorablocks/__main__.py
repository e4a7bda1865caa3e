from lorablocks.cli import main

main()
