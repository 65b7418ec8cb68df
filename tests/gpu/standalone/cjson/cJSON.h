/* cJSON.h (standalone GPU build): cJSON's names for GPU machines without
 * libcjson. Parsing fails and building returns NULL, so config.json files,
 * safetensors headers and checkpoints are refused there; the standalone
 * programs use presets and synthetic weights. */
#ifndef QS_STANDALONE_CJSON_H
#define QS_STANDALONE_CJSON_H
#include <stddef.h>
typedef int cJSON_bool;
typedef struct cJSON {
    struct cJSON *next, *prev, *child;
    int type;
    char *valuestring;
    int valueint;
    double valuedouble;
    char *string;
} cJSON;
#define cJSON_ArrayForEach(e, a) for ((e) = (a) ? (a)->child : NULL; (e); (e) = (e)->next)
cJSON *cJSON_Parse(const char *s);
cJSON *cJSON_ParseWithLength(const char *s, size_t n);
void cJSON_Delete(cJSON *j);
char *cJSON_PrintUnformatted(const cJSON *j);
void cJSON_free(void *p);
cJSON *cJSON_CreateObject(void);
cJSON *cJSON_CreateNumber(double v);
cJSON *cJSON_AddArrayToObject(cJSON *o, const char *k);
cJSON *cJSON_AddObjectToObject(cJSON *o, const char *k);
cJSON *cJSON_AddNumberToObject(cJSON *o, const char *k, double v);
cJSON *cJSON_AddStringToObject(cJSON *o, const char *k, const char *v);
cJSON_bool cJSON_AddItemToArray(cJSON *a, cJSON *i);
cJSON_bool cJSON_AddItemToObject(cJSON *o, const char *k, cJSON *i);
cJSON *cJSON_GetArrayItem(const cJSON *a, int i);
int cJSON_GetArraySize(const cJSON *a);
cJSON *cJSON_GetObjectItemCaseSensitive(const cJSON *o, const char *k);
cJSON_bool cJSON_IsArray(const cJSON *j);
cJSON_bool cJSON_IsBool(const cJSON *j);
cJSON_bool cJSON_IsNumber(const cJSON *j);
cJSON_bool cJSON_IsObject(const cJSON *j);
cJSON_bool cJSON_IsString(const cJSON *j);
cJSON_bool cJSON_IsTrue(const cJSON *j);
#endif
