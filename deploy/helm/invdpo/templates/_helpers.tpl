{{/*
Chart name, or nameOverride.
*/}}
{{- define "invdpo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Release-qualified name, the prefix of every resource name (truncated to the 63 characters of a DNS label).
*/}}
{{- define "invdpo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "invdpo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The templates below take either the root context (resources shared by the release) or
(dict "ctx" $ "component" "api") for one component: api, worker, mlflow, migrate or test.

Name of a component's resources: <fullname>-<component>.
*/}}
{{- define "invdpo.componentName" -}}
{{- $ctx := ternary .ctx . (hasKey . "ctx") }}
{{- $component := ternary .component "" (hasKey . "component") }}
{{- if $component }}
{{- printf "%s-%s" (include "invdpo.fullname" $ctx) $component | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- include "invdpo.fullname" $ctx }}
{{- end }}
{{- end }}

{{/*
Selector labels: app.kubernetes.io/name and instance only, nothing that changes on upgrade (selectors are
immutable). Each component is its own application name (invdpo-api, invdpo-worker, invdpo-mlflow), so the
Deployments' selectors never overlap; app.kubernetes.io/part-of groups them.
*/}}
{{- define "invdpo.selectorLabels" -}}
{{- $ctx := ternary .ctx . (hasKey . "ctx") }}
{{- $component := ternary .component "" (hasKey . "component") }}
{{- $name := include "invdpo.name" $ctx }}
{{- if $component }}
{{- $name = printf "%s-%s" $name $component | trunc 63 | trimSuffix "-" }}
{{- end -}}
app.kubernetes.io/name: {{ $name }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
{{- end }}

{{/*
Common labels: the selector labels plus chart, version, component and manager.
*/}}
{{- define "invdpo.labels" -}}
{{- $ctx := ternary .ctx . (hasKey . "ctx") }}
{{- $component := ternary .component "" (hasKey . "component") -}}
helm.sh/chart: {{ include "invdpo.chart" $ctx }}
{{ include "invdpo.selectorLabels" . }}
{{- with $component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
app.kubernetes.io/part-of: {{ include "invdpo.name" $ctx }}
{{- with $ctx.Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
{{- end }}

{{/*
Name of the ServiceAccount the pods run as.
*/}}
{{- define "invdpo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "invdpo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference; takes (dict "ctx" $ "image" .Values.api.image). The tag defaults to the chart's appVersion.
*/}}
{{- define "invdpo.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/*
Tracking URI of the MLflow server: the release's own Service, or mlflow.externalTrackingUri.
*/}}
{{- define "invdpo.mlflowTrackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s:%d" (include "invdpo.componentName" (dict "ctx" . "component" "mlflow")) (int .Values.mlflow.service.port) }}
{{- else }}
{{- required "mlflow.externalTrackingUri is required when mlflow.enabled is false" .Values.mlflow.externalTrackingUri }}
{{- end }}
{{- end }}

{{/*
S3 client variables, read by boto3 itself (the services, and MLflow's artifact proxy).
*/}}
{{- define "invdpo.s3Env" -}}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.secretAccessKeyKey }}
{{- end }}
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- if .Values.s3.checksumsWhenRequired }}
- name: AWS_REQUEST_CHECKSUM_CALCULATION
  value: when_required
- name: AWS_RESPONSE_CHECKSUM_VALIDATION
  value: when_required
{{- end }}
{{- end }}

{{/*
The job database URL (INVDPO_DATABASE_URL), from its Secret.
*/}}
{{- define "invdpo.databaseEnv" -}}
- name: INVDPO_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "database.existingSecret is required" .Values.database.existingSecret }}
      key: {{ .Values.database.urlKey }}
{{- end }}

{{/*
Settings shared by the API and the workers: database, broker, MLflow, log level, S3.
*/}}
{{- define "invdpo.serviceEnv" -}}
{{ include "invdpo.databaseEnv" . }}
- name: INVDPO_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "broker.existingSecret is required" .Values.broker.existingSecret }}
      key: {{ .Values.broker.urlKey }}
- name: INVDPO_MLFLOW_TRACKING_URI
  value: {{ include "invdpo.mlflowTrackingUri" . | quote }}
{{- if .Values.mlflow.enabled }}
{{ include "invdpo.mlflowServiceUserEnv" . }}
{{- end }}
- name: INVDPO_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
{{- with .Values.config.maxRuntimeSeconds }}
- name: INVDPO_MAX_RUNTIME_SECONDS
  value: {{ . | int64 | quote }}
{{- end }}
{{ include "invdpo.s3Env" . }}
{{- end }}

{{/*
Volume mount and volume of the writable /tmp every container needs under a read-only root filesystem. The
long-running containers also get an emptyDir home directory, for libraries that keep state under $HOME.
*/}}
{{- define "invdpo.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}
{{- define "invdpo.tmpVolume" -}}
- name: tmp
  emptyDir: {}
{{- end }}

{{/*
An emptyDir source, in flow style; takes its size limit ("" for none).
*/}}
{{- define "invdpo.emptyDir" -}}
{{- if . }}{{ printf "{sizeLimit: %s}" . }}{{ else }}{}{{ end }}
{{- end }}

{{/*
Exec probe command: the worker's heartbeat file exists and is younger than worker.heartbeat.maxAgeSeconds.
*/}}
{{- define "invdpo.heartbeatCommand" -}}
- python
- -c
- "import os, sys, time; sys.exit(time.time() - os.stat(sys.argv[1]).st_mtime > float(sys.argv[2]))"
- {{ .Values.worker.heartbeat.file | quote }}
- {{ .Values.worker.heartbeat.maxAgeSeconds | int64 | quote }}
{{- end }}

{{/*
The MLflow service user (the MLflow client reads these variables itself): the API, the workers, the user Job.
*/}}
{{- define "invdpo.mlflowServiceUserEnv" -}}
- name: MLFLOW_TRACKING_USERNAME
  value: {{ .Values.mlflow.serviceUser.username | quote }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.serviceUser.existingSecret }}
      key: {{ .Values.mlflow.serviceUser.passwordKey }}
{{- end }}
