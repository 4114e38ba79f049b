// CPU attention (being written).
