// CPU matvec family (being written).
