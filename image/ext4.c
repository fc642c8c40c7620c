// ext2/3/4 access for package image through libext2fs (e2fsprogs), the library e2fsck and debugfs are built on.
// All I/O goes through prov_io_manager, which calls back into Go (provReadAt/provWriteAt): the image package's
// transactional overlay decides when and how bytes reach the image.
#include "ext4.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

extern int provReadAt(uintptr_t h, void *buf, long long off, int len);
extern int provWriteAt(uintptr_t h, void *buf, long long off, int len);

struct prov_private {
	uintptr_t h;
};

static struct struct_io_manager prov_io_manager_s;

static errcode_t prov_io_open(const char *name, int flags, io_channel *channel) {
	unsigned long long h = 0;
	if (sscanf(name, "ovl:%llu", &h) != 1 || h == 0) return EXT2_ET_BAD_DEVICE_NAME;
	io_channel io = calloc(1, sizeof(struct struct_io_channel));
	struct prov_private *p = calloc(1, sizeof(struct prov_private));
	if (!io || !p) {
		free(io);
		free(p);
		return EXT2_ET_NO_MEMORY;
	}
	io->magic = EXT2_ET_MAGIC_IO_CHANNEL;
	io->manager = &prov_io_manager_s;
	io->name = strdup(name);
	io->block_size = 1024;
	io->refcount = 1;
	io->flags = flags;
	p->h = (uintptr_t)h;
	io->private_data = p;
	*channel = io;
	return 0;
}

static errcode_t prov_io_close(io_channel channel) {
	if (--channel->refcount > 0) return 0;
	free(channel->private_data);
	free(channel->name);
	free(channel);
	return 0;
}

static errcode_t prov_io_set_blksize(io_channel channel, int blksize) {
	channel->block_size = blksize;
	return 0;
}

static errcode_t prov_io_read_blk64(io_channel channel, unsigned long long block, int count, void *data) {
	struct prov_private *p = channel->private_data;
	long long size = count < 0 ? -(long long)count : (long long)count * channel->block_size;
	if (provReadAt(p->h, data, (long long)block * channel->block_size, (int)size) != 0) return EXT2_ET_SHORT_READ;
	return 0;
}

static errcode_t prov_io_write_blk64(io_channel channel, unsigned long long block, int count, const void *data) {
	struct prov_private *p = channel->private_data;
	long long size = count < 0 ? -(long long)count : (long long)count * channel->block_size;
	if (provWriteAt(p->h, (void *)data, (long long)block * channel->block_size, (int)size) != 0) return EXT2_ET_SHORT_WRITE;
	return 0;
}

static errcode_t prov_io_read_blk(io_channel channel, unsigned long block, int count, void *data) {
	return prov_io_read_blk64(channel, block, count, data);
}

static errcode_t prov_io_write_blk(io_channel channel, unsigned long block, int count, const void *data) {
	return prov_io_write_blk64(channel, block, count, data);
}

static errcode_t prov_io_write_byte(io_channel channel, unsigned long offset, int count, const void *data) {
	struct prov_private *p = channel->private_data;
	if (provWriteAt(p->h, (void *)data, (long long)offset, count) != 0) return EXT2_ET_SHORT_WRITE;
	return 0;
}

static errcode_t prov_io_flush(io_channel channel) { return 0; }

static errcode_t prov_io_set_option(io_channel channel, const char *option, const char *arg) {
	return EXT2_ET_INVALID_ARGUMENT;
}

static struct struct_io_manager prov_io_manager_s = {
	.magic = EXT2_ET_MAGIC_IO_MANAGER,
	.name = "provision overlay",
	.open = prov_io_open,
	.close = prov_io_close,
	.set_blksize = prov_io_set_blksize,
	.read_blk = prov_io_read_blk,
	.write_blk = prov_io_write_blk,
	.flush = prov_io_flush,
	.write_byte = prov_io_write_byte,
	.set_option = prov_io_set_option,
	.read_blk64 = prov_io_read_blk64,
	.write_blk64 = prov_io_write_blk64,
};

errcode_t prov_open(const char *name, int rw, ext2_filsys *out) {
	int flags = EXT2_FLAG_64BITS | (rw ? EXT2_FLAG_RW : 0);
	errcode_t err = ext2fs_open2(name, NULL, flags, 0, 0, &prov_io_manager_s, out);
	if (err) return err;
	if (rw) {
		err = ext2fs_read_bitmaps(*out);
		if (err) {
			ext2fs_free(*out);
			*out = NULL;
		}
	}
	return err;
}

int prov_state(ext2_filsys fs) {
	int s = 0;
	if (!(fs->super->s_state & EXT2_VALID_FS)) s |= PROV_NOT_CLEAN;
	if (fs->super->s_state & EXT2_ERROR_FS) s |= PROV_HAS_ERRORS;
	if (ext2fs_has_feature_journal_needs_recovery(fs->super)) s |= PROV_NEEDS_RECOVERY;
	if (fs->super->s_error_count) s |= PROV_HAS_ERRORS;
	return s;
}

void prov_info(ext2_filsys fs, unsigned long long *free_bytes, unsigned long long *free_inodes, unsigned int *block_size, char *label) {
	// The group descriptors are authoritative: the kernel updates the superblock's totals lazily.
	unsigned long long blocks = 0, inodes = 0;
	for (dgrp_t g = 0; g < fs->group_desc_count; g++) {
		blocks += ext2fs_bg_free_blocks_count(fs, g);
		inodes += ext2fs_bg_free_inodes_count(fs, g);
	}
	*free_bytes = blocks * (unsigned long long)fs->blocksize;
	*free_inodes = inodes;
	*block_size = fs->blocksize;
	memcpy(label, fs->super->s_volume_name, 16);
	label[16] = 0;
}

int prov_has_extents(ext2_filsys fs) { return ext2fs_has_feature_extents(fs->super) ? 1 : 0; }

unsigned long long prov_size(ext2_filsys fs) { return ext2fs_blocks_count(fs->super) * (unsigned long long)fs->blocksize; }

errcode_t prov_close(ext2_filsys fs, int discard) {
	if (discard) {
		ext2fs_free(fs);
		return 0;
	}
	return ext2fs_close_free(&fs);
}

static errcode_t lookup(ext2_filsys fs, ext2_ino_t dir, const char *name, ext2_ino_t *ino) {
	return ext2fs_lookup(fs, dir, name, strlen(name), NULL, ino);
}

errcode_t prov_stat(ext2_filsys fs, const char *path, int *mode, int *uid, int *gid, unsigned long long *size) {
	ext2_ino_t ino;
	struct ext2_inode inode;
	errcode_t err = ext2fs_namei(fs, EXT2_ROOT_INO, EXT2_ROOT_INO, path, &ino);
	if (err) return err;
	if ((err = ext2fs_read_inode(fs, ino, &inode))) return err;
	*mode = inode.i_mode;
	*uid = inode_uid(inode);
	*gid = inode_gid(inode);
	*size = EXT2_I_SIZE(&inode);
	return 0;
}

errcode_t prov_read(ext2_filsys fs, const char *path, char **buf, unsigned long long *len) {
	ext2_ino_t ino;
	struct ext2_inode inode;
	ext2_file_t f;
	unsigned int got;
	errcode_t err = ext2fs_namei(fs, EXT2_ROOT_INO, EXT2_ROOT_INO, path, &ino);
	if (err) return err;
	if ((err = ext2fs_read_inode(fs, ino, &inode))) return err;
	if (!LINUX_S_ISREG(inode.i_mode)) return EXT2_ET_FILE_NOT_FOUND;
	unsigned long long size = EXT2_I_SIZE(&inode);
	if (size > PROV_MAX_FILE) return EXT2_ET_FILE_TOO_BIG;
	*buf = malloc(size ? size : 1);
	if (!*buf) return EXT2_ET_NO_MEMORY;
	if ((err = ext2fs_file_open(fs, ino, 0, &f))) goto fail;
	unsigned long long done = 0;
	while (done < size) {
		err = ext2fs_file_read(f, *buf + done, size - done, &got);
		if (err || got == 0) break;
		done += got;
	}
	ext2fs_file_close(f);
	if (!err && done != size) err = EXT2_ET_SHORT_READ;
	if (err) goto fail;
	*len = size;
	return 0;
fail:
	free(*buf);
	*buf = NULL;
	return err;
}

// release frees an unlinked inode: its blocks, its extended-attribute block, the inode itself.
static errcode_t release(ext2_filsys fs, ext2_ino_t ino) {
	struct ext2_inode_large inode;
	errcode_t err = ext2fs_read_inode_full(fs, ino, (struct ext2_inode *)&inode, sizeof(inode));
	if (err) return err;
	if (ext2fs_inode_has_valid_blocks2(fs, (struct ext2_inode *)&inode)) {
		if ((err = ext2fs_punch(fs, ino, (struct ext2_inode *)&inode, NULL, 0, ~0ULL))) return err;
	}
	blk64_t ea = ext2fs_file_acl_block(fs, (struct ext2_inode *)&inode);
	if (ea) {
		__u32 count = 0;
		if ((err = ext2fs_adjust_ea_refcount3(fs, ea, NULL, -1, &count, ino))) return err;
		if (count == 0) ext2fs_block_alloc_stats2(fs, ea, -1);
		ext2fs_file_acl_block_set(fs, (struct ext2_inode *)&inode, 0);
	}
	inode.i_links_count = 0;
	inode.i_dtime = fs->now ? fs->now : time(NULL);
	if ((err = ext2fs_write_inode_full(fs, ino, (struct ext2_inode *)&inode, sizeof(inode)))) return err;
	ext2fs_inode_alloc_stats2(fs, ino, -1, 0);
	return 0;
}

static errcode_t link_entry(ext2_filsys fs, ext2_ino_t dir, const char *name, ext2_ino_t ino, int type) {
	errcode_t err = ext2fs_link(fs, dir, name, ino, type);
	if (err == EXT2_ET_DIR_NO_SPACE) {
		if ((err = ext2fs_expand_dir(fs, dir))) return err;
		err = ext2fs_link(fs, dir, name, ino, type);
	}
	return err;
}

// mkdir_p walks dirpath from the root, creating missing directories (mode 0755, root:root).
static errcode_t mkdir_p(ext2_filsys fs, const char *dirpath, ext2_ino_t *out) {
	ext2_ino_t cur = EXT2_ROOT_INO, next;
	char *copy = strdup(dirpath), *save = NULL, *part;
	errcode_t err = 0;
	if (!copy) return EXT2_ET_NO_MEMORY;
	for (part = strtok_r(copy, "/", &save); part; part = strtok_r(NULL, "/", &save)) {
		err = lookup(fs, cur, part, &next);
		if (err == EXT2_ET_FILE_NOT_FOUND) {
			// ext2fs_mkdir: mode 0755 (umask 022), owner 0:0, parent's link count, expands a full directory.
			err = ext2fs_mkdir(fs, cur, 0, part);
			if (err == EXT2_ET_DIR_NO_SPACE) {
				if ((err = ext2fs_expand_dir(fs, cur))) break;
				err = ext2fs_mkdir(fs, cur, 0, part);
			}
			if (err) break;
			if ((err = lookup(fs, cur, part, &next))) break;
		} else if (err) {
			break;
		}
		struct ext2_inode inode;
		if ((err = ext2fs_read_inode(fs, next, &inode))) break;
		if (!LINUX_S_ISDIR(inode.i_mode)) {
			err = EXT2_ET_NO_DIRECTORY;
			break;
		}
		cur = next;
	}
	free(copy);
	*out = cur;
	return err;
}

errcode_t prov_write(ext2_filsys fs, const char *dirpath, const char *name, const char *data, unsigned int len, int mode, int uid, int gid) {
	ext2_ino_t dino, ino, old;
	ext2_file_t f;
	unsigned int written;
	errcode_t err = mkdir_p(fs, dirpath, &dino);
	if (err) return err;
	if (lookup(fs, dino, name, &old) == 0) {
		struct ext2_inode oi;
		if ((err = ext2fs_read_inode(fs, old, &oi))) return err;
		if (LINUX_S_ISDIR(oi.i_mode)) return EXT2_ET_DIR_EXISTS;
		if ((err = ext2fs_unlink(fs, dino, name, old, 0))) return err;
		if (oi.i_links_count <= 1) {
			if ((err = release(fs, old))) return err;
		} else {
			oi.i_links_count--;
			if ((err = ext2fs_write_inode(fs, old, &oi))) return err;
		}
	}
	if (uid < 0 || gid < 0) return EXT2_ET_INVALID_ARGUMENT;
	if ((err = ext2fs_new_inode(fs, dino, LINUX_S_IFREG | mode, 0, &ino))) return err;
	if ((err = link_entry(fs, dino, name, ino, EXT2_FT_REG_FILE))) return err;
	ext2fs_inode_alloc_stats2(fs, ino, +1, 0);
	struct ext2_inode_large inode;
	memset(&inode, 0, sizeof(inode));
	inode.i_mode = LINUX_S_IFREG | (mode & 07777);
	inode.i_links_count = 1;
	inode.i_uid = uid & 0xffff;
	ext2fs_set_i_uid_high(inode, uid >> 16);
	inode.i_gid = gid & 0xffff;
	ext2fs_set_i_gid_high(inode, gid >> 16);
	inode.i_atime = inode.i_ctime = inode.i_mtime = fs->now ? fs->now : time(NULL);
	if (EXT2_INODE_SIZE(fs->super) > EXT2_GOOD_OLD_INODE_SIZE)
		inode.i_extra_isize = sizeof(struct ext2_inode_large) - EXT2_GOOD_OLD_INODE_SIZE;
	if (ext2fs_has_feature_extents(fs->super)) {
		// As misc/create_inode.c does: on an inode without the flag, opening the extent tree writes an empty
		// extent header into i_block and sets the flag (in memory); the inode is then written with it. (Setting the
		// flag on a zeroed i_block instead leaves an empty file with a corrupt extent header.)
		ext2_extent_handle_t h;
		if ((err = ext2fs_extent_open2(fs, ino, (struct ext2_inode *)&inode, &h))) return err;
		ext2fs_extent_free(h);
	}
	if ((err = ext2fs_write_new_inode(fs, ino, (struct ext2_inode *)&inode))) return err;
	if ((err = ext2fs_file_open(fs, ino, EXT2_FILE_WRITE, &f))) return err;
	unsigned int done = 0;
	while (done < len) {
		err = ext2fs_file_write(f, data + done, len - done, &written);
		if (err || written == 0) break;
		done += written;
	}
	errcode_t cerr = ext2fs_file_close(f);
	if (!err && done != len) err = EXT2_ET_SHORT_WRITE;
	return err ? err : cerr;
}

errcode_t prov_remove(ext2_filsys fs, const char *dirpath, const char *name) {
	ext2_ino_t dino, ino;
	struct ext2_inode inode;
	errcode_t err = ext2fs_namei(fs, EXT2_ROOT_INO, EXT2_ROOT_INO, dirpath, &dino);
	if (err) return err;
	if ((err = lookup(fs, dino, name, &ino))) return err;
	if ((err = ext2fs_read_inode(fs, ino, &inode))) return err;
	if (LINUX_S_ISDIR(inode.i_mode)) return EXT2_ET_DIR_EXISTS;
	if ((err = ext2fs_unlink(fs, dino, name, ino, 0))) return err;
	if (inode.i_links_count <= 1) return release(fs, ino);
	inode.i_links_count--;
	return ext2fs_write_inode(fs, ino, &inode);
}

static pthread_once_t prov_error_once = PTHREAD_ONCE_INIT;

static void prov_error_init(void) { add_error_table(&et_ext2_error_table); }

// prov_error is libext2fs's message for err. com_err knows a table only once it is registered (e2fsprogs' tools
// call add_error_table at start); without it every code reads "Unknown code ext2 N".
const char *prov_error(errcode_t err) {
	pthread_once(&prov_error_once, prov_error_init);
	return error_message(err);
}
