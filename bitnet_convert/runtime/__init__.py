"""Running a converted model: building it (whole or one decoder layer at a time), devices, ``torchrun`` processes,
memory."""
