"""Pure numpy/scipy QSM algorithms: arrays in, arrays out, no file I/O, no nipype."""
