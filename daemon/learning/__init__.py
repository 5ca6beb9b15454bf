"""Teaching the daemon your sounds: labelled windows kept as a folder dataset (`labels`), a fine-tune job that
trains, scores and hands back a checkpoint (`job`), and the desk clients talk to (`desk`)."""
