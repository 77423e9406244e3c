"""Evaluating checkpoints as the original README does: sample a prompt set at several guidance scales on many
processes (`sweep`), then FID (`fid`) and CLIP score (`clip_score`) per scale, tabled and plotted (`report`)."""
