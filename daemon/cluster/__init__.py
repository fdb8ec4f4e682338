"""Scale-out on Ray: GPU actors running geometry daemons (`geometryd cluster`) and batch workers."""
