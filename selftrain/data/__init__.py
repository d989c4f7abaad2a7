"""Data sets (the embedded synthetic benchmark and folder layouts), transforms and samplers."""
