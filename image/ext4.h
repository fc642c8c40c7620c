#ifndef PROVISION_EXT4_H
#define PROVISION_EXT4_H

#include <ext2fs/ext2fs.h>
#include <et/com_err.h>

#define PROV_NOT_CLEAN 1
#define PROV_HAS_ERRORS 2
#define PROV_NEEDS_RECOVERY 4
#define PROV_MAX_FILE (64ULL << 20)

errcode_t prov_open(const char *name, int rw, ext2_filsys *out);
int prov_state(ext2_filsys fs);
void prov_info(ext2_filsys fs, unsigned long long *free_bytes, unsigned long long *free_inodes, unsigned int *block_size, char *label);
int prov_has_extents(ext2_filsys fs);
unsigned long long prov_size(ext2_filsys fs);
errcode_t prov_close(ext2_filsys fs, int discard);
errcode_t prov_stat(ext2_filsys fs, const char *path, int *mode, int *uid, int *gid, unsigned long long *size);
errcode_t prov_read(ext2_filsys fs, const char *path, char **buf, unsigned long long *len);
errcode_t prov_write(ext2_filsys fs, const char *dirpath, const char *name, const char *data, unsigned int len, int mode, int uid, int gid);
errcode_t prov_remove(ext2_filsys fs, const char *dirpath, const char *name);
const char *prov_error(errcode_t err);

#endif
