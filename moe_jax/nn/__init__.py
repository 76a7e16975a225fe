"""Neural-network components: routing, dispatch, experts, layers, attention, stacks, losses."""
