"""Operations over whole images: create, convert, compare, map, info."""
