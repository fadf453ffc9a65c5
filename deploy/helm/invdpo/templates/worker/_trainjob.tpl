{{/*
Multi-node jobs as Kubeflow Trainer TrainJobs (worker.trainJob; services/worker/trainjob.py).

Environment of the TrainJob nodes: what the worker's training process reads, credentials as references to the same
Secrets (the worker refuses a credential given as a literal value). Rendered as a list, passed to the worker as JSON.
*/}}
{{- define "invdpo.trainJobNodeEnv" -}}
{{ include "invdpo.serviceEnv" . }}
- name: INVDPO_ARTIFACT_URI
  value: {{ printf "s3://%s/%s" .Values.s3.bucket .Values.s3.jobsPrefix | quote }}
- name: HF_HUB_OFFLINE
  value: {{ ternary "1" "0" .Values.worker.huggingface.offline | quote }}
{{- with .Values.worker.huggingface.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.worker.huggingface.tokenKey }}
{{- end }}
{{- with .Values.worker.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The worker's INVDPO_TRAINJOB_* settings.
*/}}
{{- define "invdpo.trainJobWorkerEnv" -}}
{{- $t := .Values.worker.trainJob -}}
- name: INVDPO_TRAINJOB_NAMESPACE
  value: {{ .Release.Namespace | quote }}
- name: INVDPO_TRAINJOB_RUNTIME
  value: {{ $t.runtime | quote }}
- name: INVDPO_TRAINJOB_IMAGE
  value: {{ include "invdpo.image" (dict "ctx" . "image" .Values.worker.image) | quote }}
{{- with $t.queueName }}
- name: INVDPO_TRAINJOB_QUEUE_NAME
  value: {{ . | quote }}
{{- end }}
- name: INVDPO_TRAINJOB_POD_LABELS
  value: {{ dict "app.kubernetes.io/name" (printf "%s-trainjob" (include "invdpo.name" .)) "app.kubernetes.io/instance" .Release.Name "app.kubernetes.io/part-of" (include "invdpo.name" .) | toJson | quote }}
- name: INVDPO_TRAINJOB_NODE_SELECTOR
  value: {{ $t.nodeSelector | default dict | toJson | quote }}
- name: INVDPO_TRAINJOB_TOLERATIONS
  value: {{ $t.tolerations | default list | toJson | quote }}
- name: INVDPO_TRAINJOB_ENV
  value: {{ include "invdpo.trainJobNodeEnv" . | fromYamlArray | toJson | quote }}
- name: INVDPO_TRAINJOB_GPU_RESOURCE
  value: {{ .Values.worker.gpu.resourceName | quote }}
- name: INVDPO_TRAINJOB_CANCEL_GRACE_SECONDS
  value: {{ $t.cancelGraceSeconds | toString | quote }}
{{- end }}
