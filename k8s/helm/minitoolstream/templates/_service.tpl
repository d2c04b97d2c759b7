{{/*
One gRPC service, ingress or egress: ServiceAccount, Deployment, Service,
HorizontalPodAutoscaler and PodDisruptionBudget. The two differ only in what
the caller passes:
  root       the chart's context ($)
  component  ingress | egress (its values are .Values.<component>)
  port       the gRPC port
  health     the gRPC health service readiness asks for
  summary    the first line of the comment heading the objects
*/}}
{{- define "minitoolstream.service" -}}
{{- $root := .root }}
{{- $values := index $root.Values .component }}
{{- $name := printf "minitoolstream-%s" .component }}
{{- $keda := and (eq .component "egress") $root.Values.keda.enabled }}
{{- $hpa := and $values.autoscaling.enabled (not $keda) }}
{{- $tls := $root.Values.tls }}
{{- $auth := $root.Values.auth }}
{{- $metricsPort := $root.Values.services.metricsPort }}
{{- $grace := $root.Values.services.terminationGracePeriodSeconds }}
{{- $preStop := $root.Values.services.preStopSeconds }}
{{- if le (int $grace) (add $preStop $root.Values.config.shutdownGraceSeconds) }}
{{- fail (printf "services.terminationGracePeriodSeconds (%v) must exceed services.preStopSeconds (%v) + config.shutdownGraceSeconds (%v), or pods are killed mid-drain" $grace $preStop $root.Values.config.shutdownGraceSeconds) }}
{{- end }}
{{- $fewest := $values.replicas }}
{{- if $keda }}{{ $fewest = $root.Values.keda.minReplicas }}
{{- else if $hpa }}{{ $fewest = $values.autoscaling.minReplicas }}
{{- end }}
{{- include "minitoolstream.checkPdb" (dict "name" .component "pdb" $values.pdb "fewest" $fewest) }}
{{- if and $auth.enabled (not (or $auth.publicKey.existingSecret $auth.sharedSecret.existingSecret $auth.jwksUrl)) }}
{{- fail "auth.enabled needs auth.publicKey.existingSecret (RS256), auth.sharedSecret.existingSecret (HS256) or auth.jwksUrl" }}
{{- end }}
# {{ .summary }} Stateless; scales on {{ if $keda }}consumer lag (KEDA){{ else }}CPU and memory{{ end }}.
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    app: {{ $name }}
    app.kubernetes.io/component: {{ .component }}
    {{- include "minitoolstream.labels" $root | nindent 4 }}
  {{- with $values.serviceAccount.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: false
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    app: {{ $name }}
    app.kubernetes.io/name: {{ $name }}
    app.kubernetes.io/component: {{ .component }}
    {{- include "minitoolstream.labels" $root | nindent 4 }}
  annotations:
    checkov.io/skip1: CKV_K8S_40=uid/gid 1000 is the project's fixed runtime user (the image's nonroot user)
    checkov.io/skip2: CKV_K8S_43=images are pinned by immutable release tag; scripts/deploy.sh can pin digests with kustomize edit set image
    checkov.io/skip3: CKV_K8S_35=the deployment guide's contract is credentials as env vars from the Secret
    checkov.io/skip4: CKV_K8S_15=IfNotPresent lets locally built images imported into k3s run; release tags are immutable
spec:
  replicas: {{ $values.replicas }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      app: {{ $name }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      # Never a ready pod fewer than replicas, so never below the PDB.
      maxSurge: 1
      maxUnavailable: 0
  template:
    metadata:
      labels:
        app: {{ $name }}
        app.kubernetes.io/name: {{ $name }}
        app.kubernetes.io/component: {{ .component }}
        {{- include "minitoolstream.labels" $root | nindent 8 }}
      annotations:
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $metricsPort | quote }}
        prometheus.io/path: /metrics
        {{- if $root.Values.helmManaged }}
        # The services read their settings at start.
        checksum/config: {{ include (print $root.Template.BasePath "/config.yaml") $root | sha256sum }}
        {{- if not $root.Values.secret.existingSecret }}
        checksum/secret: {{ include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum }}
        {{- end }}
        {{- end }}
        {{- with $values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ $name }}
      automountServiceAccountToken: false
      # Above preStop + SHUTDOWN_GRACE_SECONDS.
      terminationGracePeriodSeconds: {{ $grace }}
      securityContext:
        {{- include "minitoolstream.podSecurityContext" $root | nindent 8 }}
      {{- with include "minitoolstream.podPlacement" (dict "root" $root "values" $values) | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              app: {{ $name }}
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              podAffinityTerm:
                topologyKey: kubernetes.io/hostname
                labelSelector:
                  matchLabels:
                    app: {{ $name }}
      containers:
        - name: {{ .component }}
          image: {{ include "minitoolstream.image" (dict "image" $values.image "root" $root) }}
          imagePullPolicy: {{ $values.image.pullPolicy }}
          ports:
            - name: grpc
              containerPort: {{ .port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $metricsPort }}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: minitoolstream-config
            - secretRef:
                name: {{ include "minitoolstream.secretName" $root }}
          env:
            - name: SERVER_PORT
              value: {{ .port | quote }}
            - name: METRICS_PORT
              value: {{ $metricsPort | quote }}
            {{- if $tls.enabled }}
            - name: TLS_CERT_FILE
              value: /etc/minitoolstream/tls/tls.crt
            - name: TLS_KEY_FILE
              value: /etc/minitoolstream/tls/tls.key
            {{- if $tls.clientCA.secretName }}
            - name: TLS_CLIENT_CA_FILE
              value: /etc/minitoolstream/client-ca/{{ $tls.clientCA.key }}
            {{- end }}
            {{- end }}
            {{- if $auth.enabled }}
            - name: AUTH_ENABLED
              value: "true"
            - name: REQUIRE_AUTH
              value: {{ $auth.required | quote }}
            - name: JWT_ISSUER
              value: {{ $auth.issuer | quote }}
            {{- if $auth.publicKey.existingSecret }}
            - name: JWT_PUBLIC_KEY_FILE
              value: /etc/minitoolstream/jwt/{{ $auth.publicKey.key }}
            {{- end }}
            {{- if $auth.sharedSecret.existingSecret }}
            - name: JWT_SECRET_FILE
              value: /etc/minitoolstream/jwt-secret/{{ $auth.sharedSecret.key }}
            {{- end }}
            {{- if $auth.jwksUrl }}
            - name: JWT_JWKS_URL
              value: {{ $auth.jwksUrl | quote }}
            {{- end }}
            {{- if $auth.audience }}
            - name: JWT_AUDIENCE
              value: {{ $auth.audience | quote }}
            {{- end }}
            - name: JWT_KEYS_REFRESH_SECONDS
              value: {{ $auth.keysRefreshSeconds | quote }}
            {{- end }}
            {{- with $values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          resources:
            {{- toYaml $values.resources | nindent 12 }}
          {{- if $tls.enabled }}
          # Kubelet's gRPC probes cannot speak TLS: the plain HTTP /livez and
          # /readyz of the metrics port follow the gRPC health status.
          startupProbe:
            httpGet:
              port: metrics
              path: /livez
            periodSeconds: 2
            failureThreshold: 45
          livenessProbe:
            httpGet:
              port: metrics
              path: /livez
            periodSeconds: 10
            timeoutSeconds: 2
            failureThreshold: 3
          readinessProbe:
            httpGet:
              port: metrics
              path: /readyz
            periodSeconds: 5
            timeoutSeconds: 2
            failureThreshold: 2
          {{- else }}
          startupProbe:
            grpc:
              port: {{ .port }}
              service: liveness
            periodSeconds: 2
            failureThreshold: 45
          livenessProbe:
            # The process answers; dependency outages must not restart pods.
            grpc:
              port: {{ .port }}
              service: liveness
            periodSeconds: 10
            timeoutSeconds: 2
            failureThreshold: 3
          readinessProbe:
            # SERVING only while Tarantool and the object store answer.
            grpc:
              port: {{ .port }}
              service: {{ .health }}
            periodSeconds: 5
            timeoutSeconds: 2
            failureThreshold: 2
          {{- end }}
          lifecycle:
            preStop:
              # Let endpoint removal reach every proxy before draining starts.
              sleep:
                seconds: {{ $preStop }}
          securityContext:
            {{- include "minitoolstream.containerSecurityContext" $root | nindent 12 }}
          {{- if or $tls.enabled $auth.enabled }}
          volumeMounts:
            {{- if $tls.enabled }}
            - name: tls
              mountPath: /etc/minitoolstream/tls
              readOnly: true
            {{- if $tls.clientCA.secretName }}
            - name: client-ca
              mountPath: /etc/minitoolstream/client-ca
              readOnly: true
            {{- end }}
            {{- end }}
            {{- if and $auth.enabled $auth.publicKey.existingSecret }}
            - name: jwt
              mountPath: /etc/minitoolstream/jwt
              readOnly: true
            {{- end }}
            {{- if and $auth.enabled $auth.sharedSecret.existingSecret }}
            - name: jwt-secret
              mountPath: /etc/minitoolstream/jwt-secret
              readOnly: true
            {{- end }}
          {{- end }}
      {{- if or $tls.enabled $auth.enabled }}
      volumes:
        {{- if $tls.enabled }}
        - name: tls
          secret:
            secretName: {{ $tls.secretName }}
            defaultMode: 0440
        {{- if $tls.clientCA.secretName }}
        - name: client-ca
          secret:
            secretName: {{ $tls.clientCA.secretName }}
            defaultMode: 0440
        {{- end }}
        {{- end }}
        {{- if and $auth.enabled $auth.publicKey.existingSecret }}
        - name: jwt
          secret:
            secretName: {{ $auth.publicKey.existingSecret }}
            defaultMode: 0440
        {{- end }}
        {{- if and $auth.enabled $auth.sharedSecret.existingSecret }}
        - name: jwt-secret
          secret:
            secretName: {{ $auth.sharedSecret.existingSecret }}
            defaultMode: 0440
        {{- end }}
      {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}-service
  namespace: {{ $root.Release.Namespace }}
  labels:
    app: {{ $name }}
    app.kubernetes.io/component: {{ .component }}
    {{- include "minitoolstream.labels" $root | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    app: {{ $name }}
  ports:
    - name: grpc
      port: {{ .port }}
      targetPort: grpc
      protocol: TCP
      {{- if not $tls.enabled }}
      appProtocol: kubernetes.io/h2c
      {{- end }}
    - name: metrics
      port: {{ $metricsPort }}
      targetPort: metrics
      protocol: TCP
{{- if $hpa }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}-hpa
  namespace: {{ $root.Release.Namespace }}
  labels:
    app: {{ $name }}
    app.kubernetes.io/component: {{ .component }}
    {{- include "minitoolstream.labels" $root | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ $values.autoscaling.minReplicas }}
  maxReplicas: {{ $values.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $values.autoscaling.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ $values.autoscaling.targetMemoryUtilizationPercentage }}
  {{- with $values.autoscaling.behavior }}
  behavior:
    {{- include "minitoolstream.hpaBehavior" . | trim | nindent 4 }}
  {{- end }}
{{- end }}
{{- if $values.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $name }}-pdb
  namespace: {{ $root.Release.Namespace }}
  labels:
    app: {{ $name }}
    app.kubernetes.io/component: {{ .component }}
    {{- include "minitoolstream.labels" $root | nindent 4 }}
spec:
  minAvailable: {{ $values.pdb.minAvailable }}
  selector:
    matchLabels:
      app: {{ $name }}
{{- end }}
{{- end }}
