"""`make demo`: the product end to end on one machine, with nothing but this repository."""
