from hpcds.cli import main

main()
