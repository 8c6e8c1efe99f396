"""`xclip reproduce`: each paper's headline effect on the built-in world, one module a part.

    spelling.py coop.py spatial.py textspan.py zerocap.py   the parts: settings, QUICK sizes, check, run, report,
                                                            figure (the same names in each; parts.py lists them)
    common.py   the CLIP, mean +- std over seeds, report cells
    report.py   reproduction.md + reproduction.png from the part JSONs in the output folder
    cli.py      the command line: `xclip reproduce` = `python -m xclip.reproduction` (what `make reproduce` runs)
"""
