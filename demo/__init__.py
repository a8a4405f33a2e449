"""The packaged real model and corpora (`assets`) and `pipeline demo`: the only code that uses both stages."""
